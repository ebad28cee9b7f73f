"""N-gram (prompt lookup) proposer: no model; guesses that the text repeats itself.

Like vLLM's `method="ngram"` (prompt_lookup_min / prompt_lookup_max) and transformers'
prompt_lookup_decoding (Saxena 2023): take the last n tokens of a request's prompt + output, find an
earlier occurrence of them in the same sequence and propose the k tokens that followed it. Longer
n-grams are tried first (max_ngram down to min_ngram: a longer match is better evidence); among
occurrences of the same n-gram the most recent wins (recent text predicts the next text best, e.g.
the line being edited in a code rewrite). No match: no drafts, the step samples one token as usual.

The drafts are a deterministic function of the context, so their distribution is a point mass and
`rejection_sample(..., draft_probs=None, ...)` verifies them losslessly (see rejection.py).

Cost per request and step, L tokens so far: one vectorised O(L) scan for earlier positions holding
the last token, then O(C * max_ngram) to extend those C candidates backwards; no per-request state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lifecycle.errors import ConfigError
from serve.spec_decode.proposer import DraftProposal, ProposalInput, RequestId


def find_ngram_drafts(token_ids: Sequence[int] | np.ndarray, num_tokens: int, *, min_ngram: int,
                      max_ngram: int) -> list[int]:
    """Up to `num_tokens` tokens that followed the latest earlier occurrence of the longest suffix n-gram.

    n ranges over [min_ngram, max_ngram]; an occurrence ending at index e (< L - 1, so at least one
    token follows it) may overlap the suffix itself (periodic text). Fewer than `num_tokens` drafts
    when the continuation reaches the end of the sequence; [] when no n-gram of length >= min_ngram
    recurs.
    """
    tokens = np.asarray(token_ids, dtype=np.int64)  # (L,)
    length = tokens.shape[0]
    if num_tokens <= 0 or length < min_ngram + 1:
        return []
    # Candidate ends e: earlier positions holding the last token (e < L - 1 keeps a continuation).
    ends = np.flatnonzero(tokens[:-1] == tokens[-1])  # (C,)
    if ends.size == 0:
        return []
    # match_lengths[c] = how many trailing tokens tokens[..e_c] shares with tokens[..L-1], capped at
    # max_ngram; extending only candidates still matching makes it the longest common suffix.
    match_lengths = np.zeros(ends.shape, dtype=np.int64)  # (C,)
    is_matching = np.ones(ends.shape, dtype=bool)  # (C,)
    for back in range(min(max_ngram, length - 1)):  # an n-gram with a continuation has n <= L - 1
        starts = ends - back  # (C,) index compared with tokens[L - 1 - back]
        in_range = starts >= 0  # (C,)
        is_matching &= in_range & (tokens[np.where(in_range, starts, 0)] == tokens[length - 1 - back])  # (C,)
        if not is_matching.any():
            break
        match_lengths += is_matching
    best_length = int(match_lengths.max())
    if best_length < min_ngram:
        return []
    # Among candidates matching the longest n, the latest end (flatnonzero is ascending).
    end = int(ends[match_lengths == best_length][-1])
    return tokens[end + 1:end + 1 + num_tokens].tolist()


@dataclass(frozen=True)
class NgramProposer:
    """`Proposer` by prompt lookup; stateless, so `remove` is a no-op.

    Defaults: max_ngram=4 as in vLLM's n-gram example (prompt_lookup_max=4); min_ngram=2 because a
    single repeated token is weak evidence and every wrong draft costs a verified position.
    """

    min_ngram: int = 2
    max_ngram: int = 4

    def __post_init__(self) -> None:
        if self.min_ngram < 1:
            raise ConfigError(f"min_ngram must be >= 1, got {self.min_ngram}")
        if self.max_ngram < self.min_ngram:
            raise ConfigError(f"max_ngram ({self.max_ngram}) must be >= min_ngram ({self.min_ngram})")

    def propose(self, inputs: Sequence[ProposalInput], num_tokens: int) -> DraftProposal:
        """Up to `num_tokens` drafts per request from its own tokens; point-mass drafts (no probs)."""
        drafts = [find_ngram_drafts(item.token_ids, num_tokens, min_ngram=self.min_ngram,
                                    max_ngram=self.max_ngram) for item in inputs]
        return DraftProposal(draft_token_ids=drafts, draft_probs=None)

    def remove(self, request_ids: Sequence[RequestId]) -> None:
        """Nothing is kept per request."""
        del request_ids
