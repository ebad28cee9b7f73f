"""Speculative decoding: proposers guess k tokens, the target verifies them in one forward pass.

    proposer.py    Proposer (the protocol and its call order), ProposalInput, DraftProposal
    ngram.py       NgramProposer: prompt lookup, no model, point-mass drafts
    rejection.py   rejection_sample: the lossless speculative sampling rule (Leviathan et al. 2023)
"""

from serve.spec_decode.ngram import NgramProposer, find_ngram_drafts
from serve.spec_decode.proposer import DraftProposal, ProposalInput, Proposer, RequestId
from serve.spec_decode.rejection import (RejectionSampleOutput, expected_acceptance_rate, expected_num_emitted,
                                         rejection_sample)

__all__ = [
    "DraftProposal", "NgramProposer", "ProposalInput", "Proposer", "RejectionSampleOutput", "RequestId",
    "expected_acceptance_rate", "expected_num_emitted", "find_ngram_drafts", "rejection_sample",
]
