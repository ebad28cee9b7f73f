"""Speculative decoding: proposers guess k tokens, the target verifies them in one forward pass.

    proposer.py    Proposer (the protocol and its call order), ProposalInput, DraftProposal
    ngram.py       NgramProposer: prompt lookup, no model, point-mass drafts
    draft_model.py DraftModelProposer: a small checkpoint with its own paged KV cache, kept in sync
    rejection.py   rejection_sample: the lossless speculative sampling rule (Leviathan et al. 2023)
    verify.py      verify_drafts: target logits at k+1 positions -> per-position sampler rows -> the rule
The engine's policy (who speculates, when load turns it down) is serve/engine/speculator.py.
"""

from serve.spec_decode.ngram import NgramProposer, find_ngram_drafts
from serve.spec_decode.proposer import DraftProposal, ProposalInput, Proposer, RequestId
from serve.spec_decode.rejection import (RejectionSampleOutput, expected_acceptance_rate, expected_num_emitted,
                                         rejection_sample)

__all__ = [
    "DraftProposal", "NgramProposer", "ProposalInput", "Proposer", "RejectionSampleOutput", "RequestId",
    "expected_acceptance_rate", "expected_num_emitted", "find_ngram_drafts", "rejection_sample",
]
