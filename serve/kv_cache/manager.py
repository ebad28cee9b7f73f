"""KVCacheManager: per-sequence block tables over a `BlockPool` — the scheduler's only view of KV memory.

A sequence's table maps token position p to slot `table[p // block_size] * block_size + p % block_size`.
The manager counts *slots* (`num_tokens(seq_id)`): tokens whose KV has been or is about to be written.
The scheduler owns `num_computed_tokens` (vLLM v1's one rule: computed tokens catch up with tokens) and
keeps slots = computed + scheduled-this-step.

Call order at the boundary (scheduler ↔ manager ↔ model runner):

  admission     computed, num_computed = get_computed_blocks(seq_id, token_ids, extra_key)
                new_ids = allocate_slots(seq_id, num_new_tokens, computed)   # back to back, see below
                None -> nothing changed: stop admitting, or preempt (free) someone and retry.
  each step     allocate_slots(seq_id, num_new_tokens) for the tokens it computes this step (a prefill
                chunk, 1 decode token, or 1 + k speculative drafts); None -> preempt and retry.
  after forward cache_full_blocks(seq_id, token_ids, num_computed_tokens) with the new computed count.
  spec decode   truncate(seq_id, num_computed_tokens) drops the slots of rejected drafts.
  n > 1         copy = fork(parent_id, child_id) between steps; the runner copies `copy.src_block_id`'s
                KV into `copy.dst_block_id` before the next forward pass.
  leaving       free(seq_id) whether finished, aborted, preempted (recompute: admit again later), failed.

`get_computed_blocks` must be followed by its `allocate_slots` with no other allocating call between:
a cached block it found may otherwise be evicted and reused. `allocate_slots` checks the hashes and
raises `KVCacheInvariantError` on such a stale handle rather than read another prefix's KV.

Errors: the out-of-memory path is a return value (`None`) or, for `fork`, `NoFreeBlocksError`; protocol
violations raise `KVCacheInvariantError`. Every method leaves the manager unchanged when it fails.
Not thread-safe: the scheduler's thread owns it (the async engine calls it from its step loop only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

from serve.kv_cache.block_pool import (BlockPool, KVCacheInvariantError, NoFreeBlocksError,
                                      num_blocks_for_memory_budget)
from serve.kv_cache.prefix_cache import (BlockHash, ExtraKey, PrefixCacheStats, hash_block_tokens,
                                        hash_full_blocks)

SeqId: TypeAlias = int | str


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, slots=True)
class ComputedBlocks:
    """What `get_computed_blocks` found: hand it, unchanged, to the sequence's first `allocate_slots`.

    Carries the hashes (to detect a stale handle and to extend the chain without rehashing) and the
    sequence's `extra_key`, which all its later blocks are hashed under.
    """

    block_ids: tuple[int, ...]
    block_hashes: tuple[BlockHash, ...]
    extra_key: ExtraKey
    num_queried_tokens: int


class BlockCopy(NamedTuple):
    """Copy-on-write order from `fork`: copy the KV of every layer in `src_block_id` to `dst_block_id`."""

    src_block_id: int
    dst_block_id: int


@dataclass(slots=True)
class _SeqBlocks:
    block_ids: list[int]
    num_tokens: int  # slots held: cdiv(num_tokens, block_size) == len(block_ids)
    block_hashes: list[BlockHash]  # chained hashes of block_ids[:len(block_hashes)], all full and computed
    extra_key: ExtraKey
    is_caching: bool  # admitted through get_computed_blocks: its full blocks may enter the prefix cache


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True) -> None:
        self.block_pool = BlockPool(num_blocks, block_size)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_cache_stats = PrefixCacheStats()
        self._seqs: dict[SeqId, _SeqBlocks] = {}

    @classmethod
    def from_memory_budget(cls, *, bytes_per_block: int, block_size: int, memory_budget_bytes: int | None = None,
                           memory_fraction: float | None = None, total_memory_bytes: int | None = None,
                           enable_prefix_caching: bool = True) -> KVCacheManager:
        """Size the pool from a byte budget; `bytes_per_block` comes from `kv_cache_bytes_per_block`."""
        num_blocks = num_blocks_for_memory_budget(bytes_per_block, memory_budget_bytes=memory_budget_bytes,
                                                  memory_fraction=memory_fraction,
                                                  total_memory_bytes=total_memory_bytes)
        return cls(num_blocks, block_size, enable_prefix_caching=enable_prefix_caching)

    # ---- views ----------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks available to allocation, cached-but-unreferenced (evictable) ones included."""
        return self.block_pool.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Unreferenced blocks still holding a cached prefix (counted in `num_free_blocks` too)."""
        return self.block_pool.num_cached_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by a sequence: `kv_cache_usage` for metrics. Exact."""
        return self.block_pool.usage

    @property
    def seq_ids(self) -> list[SeqId]:
        return list(self._seqs)

    def block_table(self, seq_id: SeqId) -> list[int]:
        """A copy of the sequence's block ids; block i holds positions [i * block_size, (i + 1) * block_size)."""
        return list(self._require(seq_id).block_ids)

    def num_tokens(self, seq_id: SeqId) -> int:
        """Token slots the sequence's table holds."""
        return self._require(seq_id).num_tokens

    # ---- the scheduler's calls ------------------------------------------------------------------

    def get_computed_blocks(self, seq_id: SeqId, token_ids: Sequence[int],
                            extra_key: ExtraKey = None) -> tuple[ComputedBlocks, int]:
        """Longest cached prefix of `token_ids`, in full blocks, and its length in tokens. Changes nothing.

        At least the last token is left to compute, even when the whole sequence is cached: the model
        must run on it to produce the next token's logits (vLLM's `max_cache_hit_length = num_tokens - 1`).
        So num_computed_tokens <= (len(token_ids) - 1) rounded down to a multiple of block_size.
        """
        if seq_id in self._seqs:
            raise KVCacheInvariantError(f"get_computed_blocks: sequence {seq_id!r} already holds blocks; "
                                        f"it is for admission only (free it first when re-admitting)")
        block_ids: list[int] = []
        block_hashes: list[BlockHash] = []
        if self.enable_prefix_caching and len(token_ids) > 1:
            max_num_blocks = (len(token_ids) - 1) // self.block_size
            parent: BlockHash | None = None
            # Hash lazily, block by block: a miss ends the prefix, so later blocks are never hashed.
            for start in range(0, max_num_blocks * self.block_size, self.block_size):
                parent = hash_block_tokens(parent, token_ids[start:start + self.block_size], extra_key)
                block_id = self.block_pool.cached_block_id(parent)
                if block_id is None:
                    break
                block_ids.append(block_id)
                block_hashes.append(parent)
        computed = ComputedBlocks(tuple(block_ids), tuple(block_hashes), extra_key, len(token_ids))
        return computed, len(block_ids) * self.block_size

    def allocate_slots(self, seq_id: SeqId, num_new_tokens: int,
                       computed_blocks: ComputedBlocks | None = None) -> list[int] | None:
        """Grow the sequence's table by `num_new_tokens` slots; return the NEWLY allocated block ids.

        The first call for a sequence admits it: it takes `computed_blocks` from `get_computed_blocks`
        (the table starts with those cached blocks, ref_count + 1) and records the prefix-cache stats.
        Admitted with `computed_blocks=None`, a sequence neither reads nor fills the prefix cache.
        Returns None, with no state changed, when the pool is short: test with `is None`, since an empty
        list is a success (the new slots fit in the last partial block).
        """
        if num_new_tokens < 0:
            raise KVCacheInvariantError(f"allocate_slots: num_new_tokens must be >= 0, got {num_new_tokens}")
        seq = self._seqs.get(seq_id)
        if seq is not None:
            if computed_blocks is not None:
                raise KVCacheInvariantError(f"allocate_slots: sequence {seq_id!r} is already admitted; "
                                            f"computed_blocks belong to its first call only")
            num_prior_blocks, num_prior_tokens = len(seq.block_ids), seq.num_tokens
            num_revived_blocks = 0
        else:
            cached_ids = computed_blocks.block_ids if computed_blocks is not None else ()
            if computed_blocks is not None:
                for block_id, block_hash in zip(cached_ids, computed_blocks.block_hashes):
                    if self.block_pool.cached_block_id(block_hash) != block_id:
                        raise KVCacheInvariantError(
                            f"allocate_slots: cached block {block_id} of sequence {seq_id!r} was evicted after "
                            f"get_computed_blocks; call get_computed_blocks and allocate_slots back to back")
            num_prior_blocks = len(cached_ids)
            num_prior_tokens = num_prior_blocks * self.block_size
            # Reviving a cached block takes it out of the free count, like allocating it does.
            num_revived_blocks = sum(self.block_pool.ref_count(b) == 0 for b in cached_ids)
        num_tokens = num_prior_tokens + num_new_tokens
        num_new_blocks = max(0, _cdiv(num_tokens, self.block_size) - num_prior_blocks)
        if num_new_blocks > self.block_pool.num_free_blocks - num_revived_blocks:
            return None

        if seq is None:  # admission: commit the cached prefix first so eviction cannot take it
            if computed_blocks is None:
                seq = _SeqBlocks([], 0, [], None, is_caching=False)
            else:
                self.block_pool.touch(computed_blocks.block_ids)
                seq = _SeqBlocks(list(computed_blocks.block_ids), num_prior_tokens,
                                 list(computed_blocks.block_hashes), computed_blocks.extra_key,
                                 is_caching=self.enable_prefix_caching)
                if self.enable_prefix_caching:
                    self.prefix_cache_stats.record(computed_blocks.num_queried_tokens, num_prior_tokens)
            self._seqs[seq_id] = seq
        new_block_ids = self.block_pool.allocate(num_new_blocks)
        seq.block_ids.extend(new_block_ids)
        seq.num_tokens = num_tokens
        return new_block_ids

    def cache_full_blocks(self, seq_id: SeqId, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Register the prefix hashes of blocks that became full of computed tokens (after a forward pass).

        `token_ids` is the sequence's whole token list (at least `num_computed_tokens` long); only
        tokens whose KV is written, and final (accepted drafts only), may be counted as computed.
        """
        seq = self._require(seq_id)
        if not 0 <= num_computed_tokens <= min(seq.num_tokens, len(token_ids)):
            raise KVCacheInvariantError(
                f"cache_full_blocks: sequence {seq_id!r} has {seq.num_tokens} slots and {len(token_ids)} tokens, "
                f"so it cannot have {num_computed_tokens} computed tokens")
        if not seq.is_caching:
            return
        num_hashed_blocks = len(seq.block_hashes)
        num_full_blocks = num_computed_tokens // self.block_size
        if num_full_blocks <= num_hashed_blocks:
            return
        new_hashes = hash_full_blocks(token_ids, self.block_size, seq.extra_key, start_block=num_hashed_blocks,
                                      parent_block_hash=seq.block_hashes[-1] if seq.block_hashes else None,
                                      max_num_blocks=num_full_blocks - num_hashed_blocks)
        for block_id, block_hash in zip(seq.block_ids[num_hashed_blocks:num_full_blocks], new_hashes):
            # False: another sequence registered the same prefix first; ours stays a private copy.
            self.block_pool.cache_block(block_id, block_hash)
        seq.block_hashes.extend(new_hashes)

    def fork(self, parent_seq_id: SeqId, child_seq_id: SeqId) -> BlockCopy | None:
        """The child shares the parent's full blocks (ref_count + 1) and gets a fresh last partial block.

        Call between steps, when the parent's slots all hold computed KV. Returns the copy the runner
        must do before the next forward pass (None when the parent has no partial block): without it the
        child would write its own tokens into a block the parent also writes. Raises NoFreeBlocksError,
        changing nothing, when no block is free for that copy.
        """
        parent = self._require(parent_seq_id)
        if child_seq_id in self._seqs:
            raise KVCacheInvariantError(f"fork: child sequence {child_seq_id!r} already holds blocks")
        num_full_blocks = parent.num_tokens // self.block_size
        has_partial_block = len(parent.block_ids) > num_full_blocks
        if has_partial_block and self.block_pool.num_free_blocks < 1:
            raise NoFreeBlocksError(1, self.block_pool.num_free_blocks)
        shared_block_ids = parent.block_ids[:num_full_blocks]
        self.block_pool.touch(shared_block_ids)
        copy: BlockCopy | None = None
        child_block_ids = list(shared_block_ids)
        if has_partial_block:
            (dst_block_id,) = self.block_pool.allocate(1)
            copy = BlockCopy(parent.block_ids[num_full_blocks], dst_block_id)
            child_block_ids.append(dst_block_id)
        self._seqs[child_seq_id] = _SeqBlocks(child_block_ids, parent.num_tokens, list(parent.block_hashes),
                                              parent.extra_key, parent.is_caching)
        return copy

    def truncate(self, seq_id: SeqId, num_tokens: int) -> None:
        """Keep the first `num_tokens` slots; release the blocks past them (ref_count - 1, never unhash).

        For speculative decoding: after verification keep `num_computed_tokens` (accepted drafts
        included) and drop the rejected drafts' slots. The kept partial last block must be private and
        unhashed: new tokens will overwrite its tail, which a sharer or a prefix-cache hit would read.
        """
        seq = self._require(seq_id)
        if not 0 <= num_tokens <= seq.num_tokens:
            raise KVCacheInvariantError(f"truncate: sequence {seq_id!r} holds {seq.num_tokens} slots, "
                                        f"cannot keep {num_tokens}")
        num_kept_blocks = _cdiv(num_tokens, self.block_size)
        if num_tokens % self.block_size:
            last_block_id = seq.block_ids[num_kept_blocks - 1]
            pool = self.block_pool
            if pool.ref_count(last_block_id) > 1 or pool.block_hash(last_block_id) is not None:
                raise KVCacheInvariantError(
                    f"truncate: keeping {num_tokens} tokens of sequence {seq_id!r} would make block "
                    f"{last_block_id}, which is shared or cached, its partial last block; roll back only "
                    f"tokens past the sequence's computed (and cached) prefix")
        released_block_ids = seq.block_ids[num_kept_blocks:]
        self.block_pool.free(reversed(released_block_ids))
        del seq.block_ids[num_kept_blocks:]
        del seq.block_hashes[num_tokens // self.block_size:]
        seq.num_tokens = num_tokens

    def free(self, seq_id: SeqId) -> None:
        """Release every block of the sequence (ref_count - 1); unknown ids are a no-op (abort before admission).

        Blocks are released last-first, so the sequence's tail is evicted before its shared prefix.
        """
        seq = self._seqs.pop(seq_id, None)
        if seq is not None:
            self.block_pool.free(reversed(seq.block_ids))

    def _require(self, seq_id: SeqId) -> _SeqBlocks:
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise KVCacheInvariantError(f"sequence {seq_id!r} holds no KV blocks (never allocated, or freed)")
        return seq
