"""Parallel sampling (n > 1): the n completions of a request share the prompt's KV blocks.

The prompt is computed once, by completion 0 (the parent); completions 1..n-1 (the siblings) fork its
block table. vLLM v0's SequenceGroup fork, on v1's one-rule scheduler:

  1. `add` puts only the parent in the scheduler; the siblings wait here, holding no KV blocks.
  2. The step in which the parent computes its prompt's last token yields the logits every completion
     draws its first token from: the engine samples each sibling's first token from the parent's row
     (`first_token_siblings`), with the sibling's own generator (seed + index), so the prompt's KV and
     its last logits are computed once, not n times.
  3. Right after that forward pass, before the parent's first token is appended (a parent finishing at
     once would free the prompt's blocks), `fork` gives each sibling the parent's table through
     `KVCacheManager.fork`: every full block is shared (ref_count + 1); the last, partial block is
     copied into a fresh block, and the copy is made now, before the next forward pass.
     Why copy eagerly instead of copy-on-first-write: every sibling writes its first token's KV into
     that block at its very next step, so a lazy copy would cost the same one step later, and we would
     need a write barrier in the runner. A prompt that ends on a block boundary has no partial block:
     nothing is copied, every block is shared, and each completion's next token opens its own block.
     Shared blocks are full and never written again (a sequence only writes past its computed tokens),
     so no completion's writes can reach another's KV.
  4. From then on a sibling is an ordinary running sequence: its preemption (recompute, with whatever
     the prefix cache kept), finish or abort only drops its own references; a shared block returns to
     the pool when the last completion holding it lets go.

A sibling that cannot fork (no free block for its copy of the partial block, or `max_num_seqs` already
running) joins the waiting queue with its first token, exactly like a preempted sequence: when admitted
it recomputes the prompt (the prefix cache, when on, serves the full blocks). Correct, just unshared.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from serve.engine.scheduler import ScheduledSeq, Scheduler
from serve.engine.sequence import Sequence
from serve.kv_cache.block_pool import NoFreeBlocksError
from serve.kv_cache.manager import KVCacheManager


class PromptSharing:
    """The siblings waiting for their parent's prompt, and the fork that hands them its blocks.

    Call order per request: `add(seqs)` at admission; each step, `first_token_siblings(item)` while
    sampling (the siblings that draw from that item's logits row); after `Scheduler.on_step_done` and
    before appending the parent's token, `fork(parent)` for each parent that had siblings there;
    `discard(parent)` when the request is aborted before its prompt was computed.
    """

    def __init__(self, scheduler: Scheduler, kv: KVCacheManager, copy_block: Callable[[int, int], None]) -> None:
        self.scheduler = scheduler
        self.kv = kv
        self.copy_block = copy_block  # (src_block_id, dst_block_id): the runner's KV copy, every layer
        self._siblings: dict[str, list[Sequence]] = {}  # parent seq_id -> siblings waiting for its prompt
        self.num_forks_total = 0  # siblings that shared the prompt's blocks
        self.num_unshared_total = 0  # siblings that could not fork and recompute their prompt

    def add(self, seqs: list[Sequence]) -> None:
        """A request's n sequences, completion 0 first: only it is scheduled until its prompt is computed."""
        self.scheduler.add(seqs[0])
        if len(seqs) > 1:
            self._siblings[seqs[0].seq_id] = seqs[1:]

    def first_token_siblings(self, item: ScheduledSeq) -> list[Sequence]:
        """The siblings that sample their first token from `item`'s logits row: those of a parent whose
        prompt this step completes (empty for anything else)."""
        seq = item.seq
        if seq.num_output_tokens or not item.completes_sequence:
            return []
        return self._siblings.get(seq.seq_id, [])

    def fork(self, parent: Sequence) -> None:
        """Give the parent's waiting siblings its prompt blocks (see the module docstring, step 3).

        Call after the forward pass that computed the prompt's last token, when the parent's slots hold
        exactly the prompt's KV, and before the parent's first token is appended."""
        siblings = self._siblings.pop(parent.seq_id, [])
        now = time.monotonic()
        for sibling in siblings:
            if len(self.scheduler.running) >= self.scheduler.config.max_num_seqs:
                copy, is_forked = None, False
            else:
                try:
                    copy, is_forked = self.kv.fork(parent.seq_id, sibling.seq_id), True
                except NoFreeBlocksError:
                    copy, is_forked = None, False
            if not is_forked:
                self.num_unshared_total += 1
                self.scheduler.add(sibling)  # recomputes its prompt when admitted, like a preempted sequence
                continue
            if copy is not None:  # before the next forward pass writes the sibling's first token there
                self.copy_block(copy.src_block_id, copy.dst_block_id)
            sibling.num_computed_tokens = parent.num_computed_tokens
            sibling.num_cached_tokens = parent.num_cached_tokens
            sibling.first_scheduled_s = now
            self.scheduler.add_running(sibling)
            self.num_forks_total += 1

    @property
    def num_waiting(self) -> int:
        """Siblings still waiting for their parent's prompt (they count as waiting requests' sequences)."""
        return sum(len(siblings) for siblings in self._siblings.values())

    def discard(self, parent: Sequence) -> None:
        """Forget the siblings of a parent whose request ends before its prompt was computed."""
        self._siblings.pop(parent.seq_id, None)
