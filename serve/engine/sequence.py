"""Sequence: the engine's mutable state for one generated output of a request.

vLLM v1's single rule (see docs/ARCHITECTURE.md): a sequence has `token_ids` (prompt, then generated)
and `num_computed_tokens` catching up with them. Prefill, chunked prefill, prefix-cache hits (start
with computed > 0) and recompute after preemption (computed back to 0) are all the same loop.
Owned by the scheduler; the engine appends sampled tokens and decides when it finishes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from serve.types import FinishReason, Request


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: str
    request: Request
    index: int  # which of the request's n outputs
    token_ids: list[int]
    num_prompt_tokens: int
    num_computed_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    num_preemptions: int = 0
    generator: Any = None  # torch.Generator for seeded sampling, created by the runner
    detokenizer: Any = None
    # Timings (seconds, time.monotonic clock, like Request.arrival_time_s).
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None
    inter_token_s: list[float] = field(default_factory=list)
    # Prompt logprobs gathered chunk by chunk (position p holds the logprob of token p, p >= 1).
    prompt_logprobs: list[Any] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def sort_key(self) -> tuple[int, float, int]:
        """Scheduling order: priority (lower first), then arrival (FCFS), then output index."""
        return (self.request.priority, self.request.arrival_time_s, self.index)
