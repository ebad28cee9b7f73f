"""BlockPool: `num_blocks` fixed-size KV blocks, their reference counts, and the prefix-cache index.

Every block is in exactly one of three states (the invariant `check_invariants` verifies):

    used       ref_count > 0                  referenced by >= 1 block table (n > 1: shared)
    cached     ref_count == 0, hash set       KV still valid; in the LRU evictable list
    free       ref_count == 0, no hash        in the free list

`num_free_blocks` = free + cached: what `allocate` can hand out (cached blocks are evicted for it).
`num_cached_blocks` = cached, reported separately. `usage` = used / num_blocks, exact after every call.

Allocation takes free blocks first, then evicts the least-recently-used cached block and drops its
hash (vLLM's automatic prefix caching evicts LRU too, docs/design/prefix_caching.md; we prefer truly
free blocks so a cached prefix survives as long as possible). A cached block hit by a new sequence is
revived by `touch`: ref_count 0 -> 1, out of the evictable list. Blocks with ref_count falling to 0
are appended at the most-recently-used end in the order given to `free`.

All three operations are O(1) per block: the free list is a stack, the evictable list an OrderedDict
(append, pop-oldest and remove-by-id are all O(1)).

Errors: `NoFreeBlocksError` when asked for more blocks than `num_free_blocks` (the scheduler preempts
on it, or checks `num_free_blocks` first); `KVCacheInvariantError` (an AssertionError) on a double
free, a ref-count underflow or touching a free block: a bug in the caller, never a user error.
Every public method validates before it mutates, so a raised error leaves the pool unchanged.

Sizing: `kv_cache_bytes_per_block` and `num_blocks_for_memory_budget` turn a model shape and a byte
budget (or a fraction of the memory the caller measured) into `num_blocks`.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable

from lifecycle.errors import ConfigError
from serve.kv_cache.prefix_cache import BlockHash


def kv_cache_bytes_per_block(*, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                             dtype_bytes: int) -> int:
    """K and V, each (block_size, num_kv_heads, head_dim) per layer: GQA shrinks it by heads / kv_heads."""
    return 2 * num_layers * num_kv_heads * head_dim * block_size * dtype_bytes


def num_blocks_for_memory_budget(bytes_per_block: int, *, memory_budget_bytes: int | None = None,
                                 memory_fraction: float | None = None,
                                 total_memory_bytes: int | None = None) -> int:
    """Whole blocks that fit in `memory_budget_bytes`, or in `memory_fraction` of `total_memory_bytes`."""
    if bytes_per_block <= 0:
        raise ConfigError(f"bytes_per_block must be > 0, got {bytes_per_block}")
    if (memory_budget_bytes is None) == (memory_fraction is None):
        raise ConfigError("give exactly one of memory_budget_bytes and memory_fraction for the KV cache")
    if memory_fraction is not None:
        if not 0.0 < memory_fraction <= 1.0:
            raise ConfigError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
        if total_memory_bytes is None or total_memory_bytes <= 0:
            raise ConfigError(f"memory_fraction={memory_fraction} needs total_memory_bytes > 0 (the memory "
                              f"the fraction is of), got {total_memory_bytes}")
        memory_budget_bytes = int(memory_fraction * total_memory_bytes)
    assert memory_budget_bytes is not None
    num_blocks = memory_budget_bytes // bytes_per_block
    if num_blocks < 1:
        raise ConfigError(f"KV cache budget of {memory_budget_bytes} bytes holds no block of {bytes_per_block} "
                          f"bytes; raise the budget (`lmforge serve --kv-cache-memory-bytes`, EngineConfig."
                          f"kv_cache_memory_bytes) to at least {bytes_per_block} or lower block_size")
    return num_blocks


class NoFreeBlocksError(RuntimeError):
    """The pool cannot supply the blocks asked for; nothing was allocated. Preempt someone and retry."""

    def __init__(self, num_requested_blocks: int, num_free_blocks: int) -> None:
        super().__init__(f"asked for {num_requested_blocks} KV blocks but only {num_free_blocks} are free "
                         f"(including evictable cached blocks); free or preempt a sequence and retry")
        self.num_requested_blocks = num_requested_blocks
        self.num_free_blocks = num_free_blocks


class KVCacheInvariantError(AssertionError):
    """A caller broke the block-accounting protocol (double free, underflow, stale block). A bug."""


class BlockPool:
    """Ids `0 .. num_blocks - 1`; each block holds `block_size` tokens of K and V for every layer."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"BlockPool needs num_blocks > 0 and block_size > 0, "
                             f"got num_blocks={num_blocks}, block_size={block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref_counts: list[int] = [0] * num_blocks
        self._block_hashes: list[BlockHash | None] = [None] * num_blocks
        # Stack: reversed so that a fresh pool hands out 0, 1, 2, … (readable tests and dumps).
        self._free_block_ids: list[int] = list(range(num_blocks - 1, -1, -1))
        # Cached, unreferenced blocks, least recently used first. Values unused.
        self._evictable_block_ids: OrderedDict[int, None] = OrderedDict()
        self._hash_to_block_id: dict[BlockHash, int] = {}
        self._num_used_blocks = 0
        self.num_evictions = 0  # cached blocks whose hash was dropped to reuse them (cumulative)

    # ---- counts -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks `allocate` can hand out now: free plus cached-but-unreferenced (evictable)."""
        return len(self._free_block_ids) + len(self._evictable_block_ids)

    @property
    def num_cached_blocks(self) -> int:
        """Unreferenced blocks that still hold a registered prefix (a subset of `num_free_blocks`)."""
        return len(self._evictable_block_ids)

    @property
    def num_used_blocks(self) -> int:
        """Blocks with ref_count > 0."""
        return self._num_used_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some sequence; cached-but-unreferenced blocks count as free."""
        return self._num_used_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> BlockHash | None:
        """The prefix hash registered for this block, or None."""
        return self._block_hashes[block_id]

    def cached_block_id(self, block_hash: BlockHash) -> int | None:
        """The block holding this prefix hash (used or cached), or None. Does not touch the LRU order."""
        return self._hash_to_block_id.get(block_hash)

    # ---- operations ---------------------------------------------------------------------------

    def allocate(self, num_blocks: int) -> list[int]:
        """Hand out `num_blocks` blocks with ref_count 1 and no hash: free ones first, then evict LRU."""
        if num_blocks < 0:
            raise KVCacheInvariantError(f"allocate: num_blocks must be >= 0, got {num_blocks}")
        if num_blocks > self.num_free_blocks:
            raise NoFreeBlocksError(num_blocks, self.num_free_blocks)
        block_ids: list[int] = []
        for _ in range(num_blocks):
            if self._free_block_ids:
                block_id = self._free_block_ids.pop()
            else:
                block_id, _ = self._evictable_block_ids.popitem(last=False)  # least recently used
                del self._hash_to_block_id[self._block_hashes[block_id]]  # type: ignore[arg-type]
                self._block_hashes[block_id] = None
                self.num_evictions += 1
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        self._num_used_blocks += num_blocks
        return block_ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """ref_count += 1 for each block (a prefix-cache hit or a fork); revives cached blocks.

        Only used or cached blocks can be touched: a free block holds no valid KV to share.
        """
        block_ids = list(block_ids)
        for block_id in block_ids:
            self._check_id(block_id)
            if self._ref_counts[block_id] == 0 and self._block_hashes[block_id] is None:
                raise KVCacheInvariantError(f"touch: block {block_id} is free (no references, no cached "
                                            f"prefix); only used or cached blocks can be shared")
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._evictable_block_ids[block_id]  # revived: no longer evictable
                self._num_used_blocks += 1
            self._ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """ref_count -= 1 for each block; at 0 a hashed block becomes cached (MRU end), others free.

        Pass a sequence's blocks last-first (vLLM's `free_blocks(reversed(...))`): its tail is the least
        likely to be shared, so it should be evicted first.
        """
        block_ids = list(block_ids)
        for block_id, num_releases in Counter(block_ids).items():
            self._check_id(block_id)
            if num_releases > self._ref_counts[block_id]:
                raise KVCacheInvariantError(f"free: block {block_id} released {num_releases} time(s) but its "
                                            f"ref_count is {self._ref_counts[block_id]} (double free)")
        for block_id in block_ids:
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._num_used_blocks -= 1
                if self._block_hashes[block_id] is not None:
                    self._evictable_block_ids[block_id] = None
                else:
                    self._free_block_ids.append(block_id)

    def cache_block(self, block_id: int, block_hash: BlockHash) -> bool:
        """Register a used, full block under its prefix hash. False when another block already holds it.

        Two sequences that computed the same prefix concurrently both hold a valid copy; the first to
        register wins and the other block stays unhashed (it returns to the free list when released).
        Re-registering a block under the hash it already holds is a no-op returning True.
        """
        self._check_id(block_id)
        if self._ref_counts[block_id] == 0:
            raise KVCacheInvariantError(f"cache_block: block {block_id} is not referenced by any sequence")
        current_hash = self._block_hashes[block_id]
        if current_hash is not None:
            if current_hash != block_hash:
                raise KVCacheInvariantError(f"cache_block: block {block_id} already holds another prefix hash")
            return True
        if block_hash in self._hash_to_block_id:
            return False
        self._block_hashes[block_id] = block_hash
        self._hash_to_block_id[block_hash] = block_id
        return True

    # ---- checking -----------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """O(num_blocks) self-check for tests and debugging; raises KVCacheInvariantError."""
        free_ids, evictable_ids = set(self._free_block_ids), set(self._evictable_block_ids)
        if len(free_ids) != len(self._free_block_ids):
            raise KVCacheInvariantError("a block is in the free list twice")
        if free_ids & evictable_ids:
            raise KVCacheInvariantError(f"blocks both free and cached: {sorted(free_ids & evictable_ids)}")
        num_used = 0
        for block_id, (ref_count, block_hash) in enumerate(zip(self._ref_counts, self._block_hashes)):
            if ref_count < 0:
                raise KVCacheInvariantError(f"block {block_id} has ref_count {ref_count}")
            num_used += ref_count > 0
            is_listed = block_id in free_ids or block_id in evictable_ids
            if (ref_count == 0) != is_listed:
                raise KVCacheInvariantError(f"block {block_id}: ref_count {ref_count} but "
                                            f"{'listed' if is_listed else 'not listed'} as free/cached")
            if block_id in free_ids and block_hash is not None:
                raise KVCacheInvariantError(f"free block {block_id} still holds a prefix hash")
            if block_id in evictable_ids and block_hash is None:
                raise KVCacheInvariantError(f"cached block {block_id} holds no prefix hash")
            if block_hash is not None and self._hash_to_block_id.get(block_hash) != block_id:
                raise KVCacheInvariantError(f"block {block_id}'s hash does not map back to it")
        if len(self._hash_to_block_id) != sum(h is not None for h in self._block_hashes):
            raise KVCacheInvariantError("the hash index holds entries for blocks that do not hold that hash")
        if num_used != self._num_used_blocks:
            raise KVCacheInvariantError(f"num_used_blocks is {self._num_used_blocks}, counted {num_used}")

    def _check_id(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise KVCacheInvariantError(f"block id {block_id} outside 0..{self.num_blocks - 1}")
