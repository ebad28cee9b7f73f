"""Continuous-batching scheduler with a token budget, chunked prefill, prefix caching and preemption.

Every step (vLLM v1's scheduler, simplified):
1. Running sequences first, in priority/arrival order: each asks for the tokens it has not computed
   (one decode token, the rest of a chunked prompt, or 1 + k speculative drafts), capped by the step's
   token budget. When the KV pool cannot hold them, the lowest-priority, latest-arriving running
   sequence is preempted (its blocks freed; it will recompute, with whatever the prefix cache kept),
   until the allocation fits or the asking sequence itself was the victim.
2. Then, if nobody was preempted, waiting sequences are admitted in priority/arrival order: the
   prefix cache supplies every cached full block of the prompt, and the rest is scheduled, split into
   chunks when it exceeds the remaining budget (so running decodes keep flowing past a long prompt).
3. Last, if nobody was preempted, speculative drafts (vLLM v1: drafts are just more tokens to compute):
   a decoding sequence the engine proposed drafts for computes its last token + up to k drafts, from
   the budget and the free KV blocks that are left. Drafts only ever take what nobody else asked for:
   they never preempt, never delay an admission, and are cut short (to zero) when budget or blocks run
   out. After the forward pass `on_step_done` keeps the accepted drafts' KV and rolls back the rest.
Nothing here touches tensors: the model runner reads the `SchedulerOutput`.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Mapping, Sequence as Seq
from dataclasses import dataclass, field

from serve.engine.sequence import Sequence, SequenceStatus
from serve.kv_cache.manager import KVCacheManager


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256  # sequences running at once
    max_num_batched_tokens: int = 2048  # tokens computed per step (the budget)
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, starting at seq.num_computed_tokens (drafts included)
    # Speculative drafts computed after the sequence's last token (the last num_drafts of the new tokens).
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def completes_sequence(self) -> bool:
        """After this step every token is computed, so the last position's logits are sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens + len(self.draft_token_ids)

    @property
    def num_drafts(self) -> int:
        return len(self.draft_token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: list[Sequence] = []  # kept sorted by sort_key
        self.running: list[Sequence] = []  # kept sorted by sort_key
        self.num_preemptions_total = 0

    # ----------------------------------------------------------------------------- queue ops
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def add_running(self, seq: Sequence) -> None:
        """Put a sequence that already holds its KV blocks straight into the running queue (n > 1: a
        sibling forked from its parent's prompt, see parallel_sampling.py). The caller checks max_num_seqs."""
        seq.status = SequenceStatus.RUNNING
        bisect.insort(self.running, seq, key=lambda s: s.sort_key)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished, aborted or failed) and return its blocks to the pool."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq.seq_id)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ------------------------------------------------------------------------------ schedule
    def schedule(self, draft_token_ids: Mapping[str, Seq[int]] | None = None) -> SchedulerOutput:
        """Decide this step's work (see the module docstring). `draft_token_ids`: seq_id -> drafts the
        engine proposes to verify after that sequence's last token (only decoding sequences use them)."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        now = time.monotonic()

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while self.kv.allocate_slots(seq.seq_id, num_new) is None:
                victim = self.running.pop()  # lowest priority, latest arrival
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # it preempted itself: nothing smaller fits either
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
            i += 1

        if not out.preempted:
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                seq = self.waiting[0]
                computed, num_cached = None, 0
                if self.config.enable_prefix_caching:
                    # Prompt logprobs need the logits at every position before the first token they score
                    # (prompt_logprobs_start): the cache may serve only the prompt before that position.
                    params = seq.request.params
                    cacheable = seq.token_ids if params.prompt_logprobs is None \
                        else seq.token_ids[:params.prompt_logprobs_start]
                    if len(cacheable) > 1:
                        computed, num_cached = self.kv.get_computed_blocks(seq.seq_id, cacheable)
                num_new = seq.num_tokens - num_cached
                if num_new > budget and not self.config.enable_chunked_prefill:
                    break
                num_new = min(num_new, budget)
                if self.kv.allocate_slots(seq.seq_id, num_new, computed) is None:
                    break
                self.waiting.pop(0)
                seq.status = SequenceStatus.RUNNING
                seq.num_computed_tokens = num_cached
                if seq.first_scheduled_s is None:
                    seq.first_scheduled_s = now
                    seq.num_cached_tokens = num_cached
                bisect.insort(self.running, seq, key=lambda s: s.sort_key)
                out.scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new

        if draft_token_ids and not out.preempted:
            for item in out.scheduled:
                drafts = draft_token_ids.get(item.seq.seq_id)
                if not drafts or budget <= 0 or not (item.num_new_tokens == 1 and item.completes_sequence):
                    continue
                num_drafts = min(len(drafts), budget)
                # Fewer drafts when the pool is short; allocate_slots changes nothing when it fails.
                while num_drafts > 0 and self.kv.allocate_slots(item.seq.seq_id, num_drafts) is None:
                    num_drafts -= 1
                if num_drafts:
                    item.draft_token_ids = list(drafts[:num_drafts])
                    item.num_new_tokens += num_drafts
                    budget -= num_drafts
        return out

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: free the blocks, forget computed tokens, back to the waiting queue."""
        self.kv.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions_total += 1
        self.add(seq)

    # ---------------------------------------------------------------------------- after step
    def on_step_done(self, item: ScheduledSeq, num_accepted_drafts: int = 0) -> None:
        """Advance computed tokens and publish newly full blocks to the prefix cache.

        Call before the step's sampled tokens are appended. With drafts, the KV written for the first
        `num_accepted_drafts` of them is the target's KV of the accepted tokens, so it stays computed;
        the rejected drafts' slots are rolled back first, so `cache_full_blocks` never sees them.
        Afterwards num_computed_tokens == the number of tokens whose KV is valid == slots held.
        """
        seq = item.seq
        if not 0 <= num_accepted_drafts <= item.num_drafts:
            raise ValueError(f"{seq.seq_id}: {num_accepted_drafts} accepted of {item.num_drafts} drafts")
        seq.num_computed_tokens += item.num_new_tokens - (item.num_drafts - num_accepted_drafts)
        token_ids = seq.token_ids
        if item.draft_token_ids:
            self.kv.truncate(seq.seq_id, seq.num_computed_tokens)
            token_ids = seq.token_ids + item.draft_token_ids[:num_accepted_drafts]
        if self.config.enable_prefix_caching:
            self.kv.cache_full_blocks(seq.seq_id, token_ids, seq.num_computed_tokens)
