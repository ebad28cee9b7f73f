"""`serve.spec_decode.ngram` and the proposer boundary types (`DraftProposal`)."""

from __future__ import annotations

import random

import pytest
import torch

from lifecycle.errors import ConfigError
from serve.spec_decode.ngram import NgramProposer, find_ngram_drafts
from serve.spec_decode.proposer import DraftProposal, ProposalInput, Proposer


def brute_force_drafts(tokens: list[int], k: int, min_ngram: int, max_ngram: int) -> list[int]:
    """The spec read literally: n from max down to min, latest earlier occurrence, its next k tokens."""
    length = len(tokens)
    for n in range(max_ngram, min_ngram - 1, -1):
        if n + 1 > length:
            continue
        suffix = tokens[length - n:]
        for start in range(length - n - 1, -1, -1):  # the occurrence must be followed by >= 1 token
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


def test_latest_occurrence_wins() -> None:
    tokens = [1, 2, 3, 9, 1, 2, 3, 8, 5, 1, 2, 3]
    assert find_ngram_drafts(tokens, 2, min_ngram=1, max_ngram=3) == [8, 5]


def test_longer_ngram_is_preferred_over_a_later_shorter_one() -> None:
    tokens = [7, 2, 3, 4, 5, 9, 2, 3, 6, 7, 2, 3]  # [7, 2, 3] at 0; [2, 3] also at 6 (later)
    assert find_ngram_drafts(tokens, 3, min_ngram=1, max_ngram=3) == [4, 5, 9]
    assert find_ngram_drafts(tokens, 3, min_ngram=1, max_ngram=2) == [6, 7, 2]


def test_k_caps_the_drafts_and_the_sequence_end_caps_k() -> None:
    tokens = [4, 5, 6, 7, 8, 4, 5]
    assert find_ngram_drafts(tokens, 2, min_ngram=2, max_ngram=2) == [6, 7]
    assert find_ngram_drafts(tokens, 10, min_ngram=2, max_ngram=2) == [6, 7, 8, 4, 5]
    assert find_ngram_drafts([1, 1, 1, 1], 5, min_ngram=2, max_ngram=3) == [1]  # overlapping (periodic) match
    assert find_ngram_drafts(tokens, 0, min_ngram=2, max_ngram=2) == []


def test_no_match_and_short_sequences_give_nothing() -> None:
    assert find_ngram_drafts([1, 2, 3, 4], 3, min_ngram=1, max_ngram=3) == []
    assert find_ngram_drafts([], 3, min_ngram=1, max_ngram=3) == []
    assert find_ngram_drafts([5], 3, min_ngram=1, max_ngram=3) == []
    assert find_ngram_drafts([5, 5], 3, min_ngram=2, max_ngram=3) == []  # a 2-gram needs a 3rd token
    assert find_ngram_drafts([5, 5], 3, min_ngram=1, max_ngram=3) == [5]
    assert find_ngram_drafts([1, 9, 2, 9], 3, min_ngram=2, max_ngram=4) == []  # only a 1-gram recurs


def test_matches_the_brute_force_reading_on_random_sequences() -> None:
    rng = random.Random(0)
    for _ in range(2_000):
        tokens = [rng.randrange(3) for _ in range(rng.randrange(0, 30))]
        k, min_ngram = rng.randrange(0, 6), rng.randrange(1, 4)
        max_ngram = min_ngram + rng.randrange(0, 4)
        assert find_ngram_drafts(tokens, k, min_ngram=min_ngram, max_ngram=max_ngram) == \
            brute_force_drafts(tokens, k, min_ngram, max_ngram), (tokens, k, min_ngram, max_ngram)


def test_proposer_batches_requests_and_pads_for_the_rejection_sampler() -> None:
    proposer: Proposer = NgramProposer(min_ngram=2, max_ngram=3)
    inputs = [ProposalInput("a", [1, 2, 3, 1, 2]), ProposalInput("b", [1, 2, 3]),
              ProposalInput(7, (9, 8, 9, 8))]
    proposal = proposer.propose(inputs, 4)
    assert proposal.draft_token_ids == [[3, 1, 2], [], [9, 8]]
    assert proposal.draft_probs is None  # point-mass drafts
    draft_token_ids, num_draft_tokens = proposal.padded()
    assert draft_token_ids.tolist() == [[3, 1, 2], [0, 0, 0], [9, 8, 0]]
    assert num_draft_tokens.tolist() == [3, 0, 2]
    proposer.remove(["a", "b", 7])
    assert proposer.propose(inputs, 4) == proposal  # stateless and deterministic


def test_draft_proposal_checks_probs_shape_and_pads_empty_batches() -> None:
    ids, counts = DraftProposal([[], []]).padded()
    assert ids.shape == (2, 0) and counts.tolist() == [0, 0]
    DraftProposal([[1, 2], [3]], torch.zeros(2, 2, 5))  # (B, K, V) with K = longest list: fine
    with pytest.raises(ValueError, match="draft_probs"):
        DraftProposal([[1, 2], [3]], torch.zeros(2, 3, 5))


def test_bad_ngram_bounds_name_the_field() -> None:
    with pytest.raises(ConfigError, match="min_ngram"):
        NgramProposer(min_ngram=0)
    with pytest.raises(ConfigError, match="max_ngram"):
        NgramProposer(min_ngram=3, max_ngram=2)
