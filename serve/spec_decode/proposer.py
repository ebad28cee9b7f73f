"""The proposer extension point: who guesses the next k tokens that the target then verifies.

Implementations: `ngram.NgramProposer` (prompt lookup, no model, point-mass drafts) and a draft model
(a small checkpoint sharing the target's tokenizer, drafts with their distributions q).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeAlias

import torch

if TYPE_CHECKING:
    from serve.types import SamplingParams

RequestId: TypeAlias = int | str


@dataclass(frozen=True)
class ProposalInput:
    """One request as the proposer sees it: every token so far (prompt, then generated).

    `params` and `generator` matter only to proposers that sample their drafts (a draft model): None
    params means greedy; a seeded request's drafts are drawn from its own `generator`.
    """

    request_id: RequestId
    token_ids: Sequence[int]
    params: SamplingParams | None = None
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class DraftProposal:
    """Drafts for a batch, aligned with the `ProposalInput`s given to `propose`.

    `draft_token_ids[b]` holds 0..num_tokens drafts for request b (empty: nothing to verify, the
    step samples one token as usual). `draft_probs` is None for point-mass proposers (the drafts are
    a deterministic function of the context, q = onehot); otherwise it is (B, K, V) with K the longest
    draft list, the distributions q the drafts were sampled from, and row b's slots past
    len(draft_token_ids[b]) padding.
    """

    draft_token_ids: list[list[int]]
    draft_probs: torch.Tensor | None = None  # (B, K, V)

    def __post_init__(self) -> None:
        if self.draft_probs is not None:
            expected = (len(self.draft_token_ids), self.max_num_drafts)
            if self.draft_probs.dim() != 3 or tuple(self.draft_probs.shape[:2]) != expected:
                raise ValueError(f"draft_probs must be (num_requests, longest draft, V) = {expected + ('V',)}, "
                                 f"got {tuple(self.draft_probs.shape)}")

    @property
    def max_num_drafts(self) -> int:
        """K: the longest draft list, the padded width `rejection_sample` takes."""
        return max((len(drafts) for drafts in self.draft_token_ids), default=0)

    def padded(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(draft_token_ids (B, K) zero-padded, num_draft_tokens (B,)): `rejection_sample`'s inputs."""
        num_drafts = [len(drafts) for drafts in self.draft_token_ids]
        width = self.max_num_drafts
        rows = [drafts + [0] * (width - len(drafts)) for drafts in self.draft_token_ids]
        draft_token_ids = torch.tensor(rows, dtype=torch.long, device=device).reshape(len(rows), width)  # (B, K)
        return draft_token_ids, torch.tensor(num_drafts, dtype=torch.long, device=device)  # (B,)


class Proposer(Protocol):
    """Proposes up to k draft tokens per request for the target to verify in one forward pass.

    Call order, once per engine step for the requests the scheduler runs with speculation on:
      1. `proposal = proposer.propose(inputs, num_tokens)` with each request's full token ids so far
         (its accepted drafts and last sampled token included). A stateful proposer (a draft model
         with its own KV cache) reconciles its state from these ids: whatever it proposed last step
         and is not in them was rejected.
      2. The scheduler appends `proposal.draft_token_ids[b]` (possibly cut short) to request b's tokens
         to compute; the runner computes the target's logits at the K+1 positions and the engine
         calls `rejection_sample` with them and `proposal.draft_probs` (serve/spec_decode/verify.py).
      3. `proposer.remove(request_ids)` when requests finish, abort or are preempted, so per-request
         state is released; stateless proposers ignore it.
    A request may get fewer than num_tokens drafts, or none; the proposer never raises for "no
    guess". It must not mutate the token ids it is given.
    """

    def propose(self, inputs: Sequence[ProposalInput], num_tokens: int) -> DraftProposal:
        """Up to `num_tokens` drafts for each input, in input order."""
        ...

    def remove(self, request_ids: Sequence[RequestId]) -> None:
        """Forget per-request state of these requests (no-op when there is none)."""
        ...
