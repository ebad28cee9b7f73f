"""Prefix caching: chained block hashes (`prefix_cache`) and their use through `KVCacheManager`."""

from __future__ import annotations

import pytest

from serve.kv_cache.block_pool import KVCacheInvariantError
from serve.kv_cache.manager import KVCacheManager
from serve.kv_cache.prefix_cache import ROOT_BLOCK_HASH, hash_block_tokens, hash_full_blocks

BLOCK_SIZE = 4
PREFIX = list(range(1000, 1012))  # 3 full blocks


def admit(manager: KVCacheManager, seq_id: int, token_ids: list[int], extra_key=None) -> int:
    """Admit a sequence, "compute" its whole prompt and cache it; returns the cache-hit length."""
    computed, num_computed = manager.get_computed_blocks(seq_id, token_ids, extra_key)
    assert manager.allocate_slots(seq_id, len(token_ids) - num_computed, computed) is not None
    manager.cache_full_blocks(seq_id, token_ids, len(token_ids))
    return num_computed


# ---- hashing ------------------------------------------------------------------------------------

def test_hashes_are_chained_over_the_parent() -> None:
    block = [5, 6, 7, 8]
    first = hash_block_tokens(None, block)
    assert first == hash_block_tokens(None, list(block))  # deterministic, no process seed
    assert len(first) == 32 and first != ROOT_BLOCK_HASH
    after_a = hash_block_tokens(hash_block_tokens(None, [1, 2, 3, 4]), block)
    after_b = hash_block_tokens(hash_block_tokens(None, [1, 2, 3, 9]), block)
    assert len({first, after_a, after_b}) == 3  # same tokens after a different prefix: different block
    # Length-prefixed encoding: splitting tokens differently never yields the same bytes.
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(None, [1, 2, 0])


def test_extra_key_is_part_of_the_hash_and_tagged_by_type() -> None:
    tokens = [1, 2, 3, 4]
    keys = [None, "a", ("lora", "a"), ("salt", "a"), 1, True, "1", b"1", ("a",), (("a",),)]
    assert len({hash_block_tokens(None, tokens, key) for key in keys}) == len(keys)
    with pytest.raises(TypeError, match="extra_key"):
        hash_block_tokens(None, tokens, 1.5)  # type: ignore[arg-type]


def test_hash_full_blocks_skips_the_partial_block_and_extends_a_chain() -> None:
    token_ids = list(range(14))  # 3 full blocks + 2 tokens
    chain = hash_full_blocks(token_ids, BLOCK_SIZE)
    assert len(chain) == 3
    assert chain[1] == hash_block_tokens(chain[0], token_ids[4:8])
    assert hash_full_blocks(token_ids, BLOCK_SIZE, start_block=1, parent_block_hash=chain[0]) == chain[1:]
    assert hash_full_blocks(token_ids, BLOCK_SIZE, max_num_blocks=2) == chain[:2]
    with pytest.raises(ValueError, match="parent_block_hash"):
        hash_full_blocks(token_ids, BLOCK_SIZE, start_block=1)


# ---- reuse through the manager ------------------------------------------------------------------

def test_shared_three_block_prefix_is_reused_and_counted_in_tokens() -> None:
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    prompt_a, prompt_b = PREFIX + [1, 2, 3], PREFIX + [4, 5, 6, 7, 8]
    assert admit(manager, 0, prompt_a) == 0
    table_a = manager.block_table(0)
    assert admit(manager, 1, prompt_b) == 12
    table_b = manager.block_table(1)
    assert table_b[:3] == table_a[:3] and not set(table_b[3:]) & set(table_a)
    assert [manager.block_pool.ref_count(b) for b in table_a] == [2, 2, 2, 1]
    assert manager.usage == 6 / 16  # 4 blocks for A, 2 more for B: shared blocks count once
    stats = manager.prefix_cache_stats
    assert (stats.num_queries, stats.num_queried_tokens, stats.num_hit_tokens) == (2, 15 + 17, 12)
    assert stats.hit_rate == 12 / 32


def test_a_fully_cached_prompt_still_leaves_its_last_token_to_compute() -> None:
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    admit(manager, 0, PREFIX + [1])
    # 12 tokens, all 3 blocks cached: 11 may be computed at most, rounded down to a block: 8.
    computed, num_computed = manager.get_computed_blocks(1, PREFIX)
    assert num_computed == 8 and len(computed.block_ids) == 2
    assert manager.get_computed_blocks(2, PREFIX + [9])[1] == 12  # 13 tokens: all 3 blocks usable
    assert manager.get_computed_blocks(3, PREFIX[:1])[1] == 0
    assert manager.get_computed_blocks(4, [])[1] == 0


def test_stats_count_admissions_not_lookups() -> None:
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    admit(manager, 0, PREFIX + [1])
    for _ in range(3):  # a waiting sequence asks every step until it is admitted
        manager.get_computed_blocks(1, PREFIX + [2])
    assert manager.prefix_cache_stats.num_queries == 1
    admit(manager, 1, PREFIX + [2])
    assert manager.prefix_cache_stats.num_hit_tokens == 12


def test_partial_blocks_are_never_shared_until_they_fill() -> None:
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    prompt = PREFIX + [1, 2, 3]
    admit(manager, 0, prompt)
    partial_block = manager.block_table(0)[3]
    assert manager.block_pool.block_hash(partial_block) is None
    assert manager.get_computed_blocks(1, prompt + [4, 5])[1] == 12  # tokens 12..14 match, not shared
    # The sequence decodes one token: the block is full of computed tokens and becomes shareable.
    assert manager.allocate_slots(0, 1) == []
    manager.cache_full_blocks(0, prompt + [4], 16)
    assert manager.block_pool.block_hash(partial_block) is not None
    computed, num_computed = manager.get_computed_blocks(1, prompt + [4, 5])
    assert num_computed == 16 and computed.block_ids[3] == partial_block


def test_extra_key_separates_identical_prefixes() -> None:
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    admit(manager, 0, PREFIX + [1], extra_key=("lora", "math"))
    assert manager.get_computed_blocks(1, PREFIX + [1])[1] == 0
    assert manager.get_computed_blocks(1, PREFIX + [1], ("lora", "code"))[1] == 0
    assert manager.get_computed_blocks(1, PREFIX + [1], ("lora", "math"))[1] == 12
    # Later blocks of a sequence are hashed under the extra key it was admitted with.
    assert manager.allocate_slots(0, 3) is not None
    manager.cache_full_blocks(0, PREFIX + [1, 2, 3, 4], 16)
    assert manager.get_computed_blocks(2, PREFIX + [1, 2, 3, 4, 5], ("lora", "math"))[1] == 16
    assert manager.get_computed_blocks(2, PREFIX + [1, 2, 3, 4, 5])[1] == 0


def test_freed_prefix_stays_cached_is_revived_and_the_tail_is_evicted_first() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    admit(manager, 0, PREFIX + [1, 2, 3])
    b0, b1, b2, b3 = manager.block_table(0)
    manager.free(0)
    assert manager.usage == 0 and manager.num_free_blocks == 4
    assert manager.num_cached_blocks == 3  # b3 was partial: plain free
    # An unrelated 8-token prompt needs 2 blocks: the free one, then the LRU cached one, which is the
    # tail of the freed sequence (released last-first), so its prefix's first blocks survive.
    admit(manager, 1, list(range(8)))
    assert set(manager.block_table(1)) == {b3, b2}
    assert manager.block_pool.num_evictions == 1
    computed, num_computed = manager.get_computed_blocks(2, PREFIX + [7])
    assert computed.block_ids == (b0, b1) and num_computed == 8
    assert manager.num_cached_blocks == 2
    assert manager.allocate_slots(2, 5, computed) is None  # 2 revived + 2 new > 2 free
    manager.free(1)
    assert manager.allocate_slots(2, 5, computed) is not None
    assert manager.block_table(2)[:2] == [b0, b1]
    assert manager.num_cached_blocks == 0  # revived: out of the evictable list
    assert [manager.block_pool.ref_count(b) for b in (b0, b1)] == [1, 1]
    manager.block_pool.check_invariants()


def test_a_stale_lookup_is_refused_instead_of_reading_another_prefix() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    admit(manager, 0, PREFIX + [1, 2, 3])
    manager.free(0)
    computed, _ = manager.get_computed_blocks(1, PREFIX + [4])
    admit(manager, 2, list(range(16)))  # evicts the whole prefix in between
    manager.free(2)
    with pytest.raises(KVCacheInvariantError, match="back to back"):
        manager.allocate_slots(1, 1, computed)
    assert manager.seq_ids == [] and manager.usage == 0


def test_two_sequences_computing_one_prefix_keep_the_first_registration() -> None:
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    for seq_id in (0, 1):  # both admitted before either computed: no hit for the second
        computed, num_computed = manager.get_computed_blocks(seq_id, PREFIX + [seq_id])
        assert num_computed == 0
        manager.allocate_slots(seq_id, 13, computed)
    for seq_id in (0, 1):
        manager.cache_full_blocks(seq_id, PREFIX + [seq_id], 13)
    pool = manager.block_pool
    assert all(pool.block_hash(b) is not None for b in manager.block_table(0)[:3])
    assert all(pool.block_hash(b) is None for b in manager.block_table(1)[:3])  # a private duplicate
    manager.free(0)
    manager.free(1)
    assert manager.num_cached_blocks == 3 and manager.usage == 0
    pool.check_invariants()


def test_disabled_prefix_caching_neither_hits_nor_registers() -> None:
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    admit(manager, 0, PREFIX + [1])
    assert admit(manager, 1, PREFIX + [1]) == 0
    assert all(manager.block_pool.block_hash(b) is None for b in manager.block_table(0))
    assert manager.prefix_cache_stats.num_queries == 0
