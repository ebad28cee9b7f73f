"""`serve.kv_cache.block_pool`: allocation, ref counts, exact usage, the cached/free split, LRU eviction."""

from __future__ import annotations

import pytest

from lifecycle.errors import ConfigError
from serve.kv_cache.block_pool import (BlockPool, KVCacheInvariantError, NoFreeBlocksError,
                                       kv_cache_bytes_per_block, num_blocks_for_memory_budget)
from serve.kv_cache.prefix_cache import hash_block_tokens


def assert_counts(pool: BlockPool, *, num_used: int, num_cached: int) -> None:
    pool.check_invariants()
    assert pool.num_used_blocks == num_used
    assert pool.num_cached_blocks == num_cached
    assert pool.num_free_blocks == pool.num_blocks - num_used  # cached blocks count as free
    assert pool.usage == num_used / pool.num_blocks


def test_allocate_and_free_track_usage_exactly() -> None:
    pool = BlockPool(num_blocks=8, block_size=4)
    assert_counts(pool, num_used=0, num_cached=0)
    first = pool.allocate(3)
    assert first == [0, 1, 2]
    assert [pool.ref_count(b) for b in first] == [1, 1, 1]
    assert_counts(pool, num_used=3, num_cached=0)
    second = pool.allocate(5)
    assert sorted(first + second) == list(range(8))
    assert_counts(pool, num_used=8, num_cached=0)
    pool.free(first)
    assert_counts(pool, num_used=5, num_cached=0)
    assert pool.allocate(0) == []
    pool.free(second)
    assert_counts(pool, num_used=0, num_cached=0)


def test_touch_shares_a_block_and_free_releases_one_reference_at_a_time() -> None:
    pool = BlockPool(num_blocks=4, block_size=4)
    (block_id,) = pool.allocate(1)
    pool.touch([block_id])
    pool.touch([block_id])
    assert pool.ref_count(block_id) == 3
    assert_counts(pool, num_used=1, num_cached=0)  # one block in use, however many sharers
    pool.free([block_id, block_id])
    assert pool.ref_count(block_id) == 1
    assert_counts(pool, num_used=1, num_cached=0)
    pool.free([block_id])
    assert_counts(pool, num_used=0, num_cached=0)


def test_exhaustion_raises_the_specific_error_and_changes_nothing() -> None:
    pool = BlockPool(num_blocks=4, block_size=4)
    pool.allocate(3)
    with pytest.raises(NoFreeBlocksError) as err:
        pool.allocate(2)
    assert (err.value.num_requested_blocks, err.value.num_free_blocks) == (2, 1)
    assert_counts(pool, num_used=3, num_cached=0)
    assert pool.allocate(1) == [3]


def test_double_free_and_underflow_are_caught_before_any_change() -> None:
    pool = BlockPool(num_blocks=4, block_size=4)
    a, b = pool.allocate(2)
    pool.free([a])
    with pytest.raises(KVCacheInvariantError, match="double free"):
        pool.free([a])
    with pytest.raises(KVCacheInvariantError, match="double free"):
        pool.free([b, b])  # ref_count 1, released twice in one call: nothing may change
    assert pool.ref_count(b) == 1
    assert_counts(pool, num_used=1, num_cached=0)
    with pytest.raises(KVCacheInvariantError, match="outside"):
        pool.free([4])
    with pytest.raises(KVCacheInvariantError, match="free"):
        pool.touch([a])  # a free block holds no KV worth sharing
    assert isinstance(KVCacheInvariantError("x"), AssertionError)


def test_cached_blocks_count_as_free_but_are_reported_and_evicted_lru() -> None:
    pool = BlockPool(num_blocks=4, block_size=2)
    block_ids = pool.allocate(4)
    hashes = [hash_block_tokens(None, [i, i]) for i in range(4)]
    for block_id, block_hash in zip(block_ids, hashes):
        assert pool.cache_block(block_id, block_hash)
    pool.free([block_ids[2], block_ids[0]])  # LRU order: 2 then 0
    assert_counts(pool, num_used=2, num_cached=2)
    pool.free([block_ids[3]])  # an unhashed block would go to the free list; this one is cached (MRU)
    assert_counts(pool, num_used=1, num_cached=3)
    assert pool.cached_block_id(hashes[0]) == block_ids[0]
    assert pool.allocate(1) == [block_ids[2]]  # least recently used cached block goes first
    assert pool.cached_block_id(hashes[2]) is None and pool.block_hash(block_ids[2]) is None
    assert pool.num_evictions == 1
    assert_counts(pool, num_used=2, num_cached=2)


def test_free_blocks_are_taken_before_cached_ones_are_evicted() -> None:
    pool = BlockPool(num_blocks=3, block_size=2)
    cached, plain = pool.allocate(2)
    block_hash = hash_block_tokens(None, [7, 7])
    pool.cache_block(cached, block_hash)
    pool.free([cached, plain])
    assert_counts(pool, num_used=0, num_cached=1)
    assert set(pool.allocate(2)) == {plain, 2}  # both truly free blocks, the cached one survives
    assert pool.cached_block_id(block_hash) == cached and pool.num_evictions == 0
    assert pool.allocate(1) == [cached]
    assert pool.num_evictions == 1


def test_touch_revives_a_cached_block_out_of_the_evictable_list() -> None:
    pool = BlockPool(num_blocks=2, block_size=2)
    block_id, other = pool.allocate(2)
    block_hash = hash_block_tokens(None, [1, 2])
    pool.cache_block(block_id, block_hash)
    pool.free([block_id])
    assert_counts(pool, num_used=1, num_cached=1)
    pool.touch([block_id])
    assert pool.ref_count(block_id) == 1
    assert_counts(pool, num_used=2, num_cached=0)
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(1)  # the revived block is no longer evictable
    assert pool.cached_block_id(block_hash) == block_id  # and it kept its hash


def test_cache_block_keeps_one_block_per_hash_and_one_hash_per_block() -> None:
    pool = BlockPool(num_blocks=3, block_size=2)
    a, b, c = pool.allocate(3)
    h1, h2 = hash_block_tokens(None, [1, 1]), hash_block_tokens(None, [2, 2])
    assert pool.cache_block(a, h1)
    assert pool.cache_block(a, h1)  # idempotent
    assert not pool.cache_block(b, h1)  # same prefix computed twice: first one wins, b stays private
    assert pool.block_hash(b) is None
    with pytest.raises(KVCacheInvariantError, match="another prefix hash"):
        pool.cache_block(a, h2)
    pool.free([c])
    with pytest.raises(KVCacheInvariantError, match="not referenced"):
        pool.cache_block(c, h2)
    pool.free([b])
    assert_counts(pool, num_used=1, num_cached=0)  # b had no hash: back to the free list


def test_bad_pool_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(num_blocks=0, block_size=16)


def test_sizing_from_a_model_shape_and_a_budget() -> None:
    # Llama-3-8B-like: 32 layers, 8 KV heads, head_dim 128, bf16, 16-token blocks -> 2 MiB per block.
    bytes_per_block = kv_cache_bytes_per_block(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16,
                                               dtype_bytes=2)
    assert bytes_per_block == 2 * 32 * 8 * 128 * 16 * 2 == 2 * 1024 * 1024
    assert num_blocks_for_memory_budget(bytes_per_block, memory_budget_bytes=10 * bytes_per_block + 5) == 10
    assert num_blocks_for_memory_budget(bytes_per_block, memory_fraction=0.5, total_memory_bytes=2**30) == 256
    with pytest.raises(ConfigError, match="exactly one"):
        num_blocks_for_memory_budget(bytes_per_block)
    with pytest.raises(ConfigError, match="total_memory_bytes"):
        num_blocks_for_memory_budget(bytes_per_block, memory_fraction=0.9)
    with pytest.raises(ConfigError, match="memory_fraction must be in"):
        num_blocks_for_memory_budget(bytes_per_block, memory_fraction=1.5, total_memory_bytes=2**30)
    with pytest.raises(ConfigError, match="holds no block"):
        num_blocks_for_memory_budget(bytes_per_block, memory_budget_bytes=2**20)
