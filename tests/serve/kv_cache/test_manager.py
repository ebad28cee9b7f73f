"""`serve.kv_cache.manager`: the scheduler's calls, and thousands of random request lifecycles against a
fake model runner whose "KV" at each slot names exactly which tokens (and extra key) produced it."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from serve.kv_cache.block_pool import KVCacheInvariantError, NoFreeBlocksError, kv_cache_bytes_per_block
from serve.kv_cache.manager import BlockCopy, KVCacheManager

BLOCK_SIZE = 4


def pool_snapshot(manager: KVCacheManager) -> tuple:
    pool = manager.block_pool
    return ({seq_id: manager.block_table(seq_id) for seq_id in manager.seq_ids},
            [pool.ref_count(b) for b in range(pool.num_blocks)], [pool.block_hash(b) for b in range(pool.num_blocks)],
            pool.num_free_blocks, pool.num_cached_blocks, pool.num_evictions, manager.prefix_cache_stats.num_queries)


def test_allocate_slots_grows_by_whole_blocks_and_returns_only_new_ones() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    computed, _ = manager.get_computed_blocks(0, [1, 2, 3, 4, 5])
    assert manager.allocate_slots(0, 5, computed) == [0, 1]
    assert manager.allocate_slots(0, 3) == []  # 8 slots fit in the 2 blocks
    assert manager.allocate_slots(0, 1) == [2]
    assert manager.block_table(0) == [0, 1, 2] and manager.num_tokens(0) == 9
    assert manager.usage == 3 / 8 and manager.num_free_blocks == 5


def test_allocate_slots_returns_none_without_side_effects_when_short() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    prompt = list(range(12))
    computed, _ = manager.get_computed_blocks(0, prompt)
    manager.allocate_slots(0, 12, computed)
    manager.cache_full_blocks(0, prompt, 12)
    manager.free(0)  # its 3 blocks stay cached, evictable
    computed, num_computed = manager.get_computed_blocks(1, prompt + [99, 98, 97, 96, 95, 94])
    assert num_computed == 12
    before = pool_snapshot(manager)
    # 3 cached blocks revived + 2 new blocks > 4 blocks: the revivals must be counted as allocations.
    assert manager.allocate_slots(1, 6, computed) is None
    assert pool_snapshot(manager) == before
    manager.allocate_slots(2, 4, manager.get_computed_blocks(2, [7] * 4)[0])
    before = pool_snapshot(manager)
    assert manager.allocate_slots(2, 16) is None  # a running sequence, short by one block
    assert pool_snapshot(manager) == before


def test_fork_shares_full_blocks_and_copies_the_partial_one() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    manager.allocate_slots(0, 10, manager.get_computed_blocks(0, list(range(10)))[0])
    parent_table = manager.block_table(0)
    copy = manager.fork(0, 1)
    child_table = manager.block_table(1)
    assert copy == BlockCopy(src_block_id=parent_table[2], dst_block_id=child_table[2])
    assert child_table[:2] == parent_table[:2] and child_table[2] not in parent_table
    assert [manager.block_pool.ref_count(b) for b in parent_table] == [2, 2, 1]
    assert manager.num_tokens(1) == 10 and manager.usage == 4 / 8
    manager.allocate_slots(0, 2)
    assert manager.fork(0, 2) is None  # 12 tokens: no partial block, nothing to copy
    assert manager.block_table(2) == manager.block_table(0)
    manager.free(0)
    manager.free(2)
    assert [manager.block_pool.ref_count(b) for b in child_table] == [1, 1, 1]
    with pytest.raises(KVCacheInvariantError, match="already holds"):
        manager.fork(1, 1)


def test_fork_without_a_free_block_raises_and_changes_nothing() -> None:
    manager = KVCacheManager(num_blocks=3, block_size=BLOCK_SIZE)
    manager.allocate_slots(0, 10, manager.get_computed_blocks(0, list(range(10)))[0])
    before = pool_snapshot(manager)
    with pytest.raises(NoFreeBlocksError):
        manager.fork(0, 1)
    assert pool_snapshot(manager) == before


def test_truncate_drops_rejected_draft_slots() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    tokens = list(range(7))
    manager.allocate_slots(0, 7, manager.get_computed_blocks(0, tokens)[0])
    manager.cache_full_blocks(0, tokens, 6)  # token 6 is sampled, not computed yet
    assert manager.allocate_slots(0, 1 + 4) == [2]  # the sampled token plus 4 drafts: 6 + 5 = 11 slots
    manager.truncate(0, 6 + 1 + 1)  # 1 draft accepted
    assert manager.block_table(0) == [0, 1] and manager.num_tokens(0) == 8
    assert manager.usage == 2 / 8 and manager.num_free_blocks == 6
    with pytest.raises(KVCacheInvariantError, match="cannot keep"):
        manager.truncate(0, 9)


def test_truncate_never_cuts_into_a_shared_or_cached_block() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    tokens = list(range(10))
    manager.allocate_slots(0, 10, manager.get_computed_blocks(0, tokens)[0])
    manager.cache_full_blocks(0, tokens, 10)
    with pytest.raises(KVCacheInvariantError, match="shared or cached"):
        manager.truncate(0, 6)  # block 1 is cached: its tail would be overwritten
    manager.truncate(0, 4)  # block-aligned: block 1 is released whole and stays cached
    assert manager.block_table(0) == [0]
    assert manager.num_cached_blocks == 1
    assert manager.get_computed_blocks(1, tokens)[1] == 8
    # Regrown with other tokens, block 1's hash is the new one: the rolled-back hash was dropped.
    other_tokens = tokens[:4] + [50, 51, 52, 53, 54]
    assert manager.allocate_slots(0, 5) == [2, 3]  # block 1 stays cached for its old prefix
    manager.cache_full_blocks(0, other_tokens, 9)
    computed, num_computed = manager.get_computed_blocks(1, other_tokens)
    assert num_computed == 8 and list(computed.block_ids) == manager.block_table(0)[:2]


def test_free_is_idempotent_and_protocol_errors_are_named() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    manager.free(42)  # aborted before admission
    computed, _ = manager.get_computed_blocks(0, [1, 2, 3])
    manager.allocate_slots(0, 3, computed)
    with pytest.raises(KVCacheInvariantError, match="admission only"):
        manager.get_computed_blocks(0, [1, 2, 3])
    with pytest.raises(KVCacheInvariantError, match="first call only"):
        manager.allocate_slots(0, 1, computed)
    with pytest.raises(KVCacheInvariantError, match="computed tokens"):
        manager.cache_full_blocks(0, [1, 2, 3, 4], 4)  # only 3 slots
    with pytest.raises(KVCacheInvariantError, match=">= 0"):
        manager.allocate_slots(0, -1)
    manager.free(0)
    manager.free(0)
    with pytest.raises(KVCacheInvariantError, match="holds no KV blocks"):
        manager.block_table(0)
    assert manager.usage == 0 and manager.num_free_blocks == 8


def test_from_memory_budget() -> None:
    bytes_per_block = kv_cache_bytes_per_block(num_layers=2, num_kv_heads=2, head_dim=8, block_size=16,
                                               dtype_bytes=4)
    manager = KVCacheManager.from_memory_budget(bytes_per_block=bytes_per_block, block_size=16,
                                                memory_budget_bytes=100 * bytes_per_block + 1)
    assert (manager.num_blocks, manager.block_size) == (100, 16)
    manager = KVCacheManager.from_memory_budget(bytes_per_block=bytes_per_block, block_size=16,
                                                memory_fraction=0.25, total_memory_bytes=400 * bytes_per_block)
    assert manager.num_blocks == 100


# ---- property test: random lifecycles against a fake runner -----------------------------------------

@dataclass
class FakeSeq:
    seq_id: int
    token_ids: list[int]
    extra_key: object
    num_computed_tokens: int = 0


class Simulation:
    """A scheduler and a model runner in miniature. `kv[slot]` = (extra_key, tokens up to that position):
    what real KV at that slot depends on. Reading a wrong slot, or writing into a shared one, shows up."""

    PREFIXES = [list(range(100, 113)), list(range(200, 208)), [300, 301, 302, 303, 304, 305]]
    MAX_NUM_TOKENS = 40

    def __init__(self, seed: int, num_blocks: int = 24) -> None:
        self.rng = random.Random(seed)
        self.manager = KVCacheManager(num_blocks=num_blocks, block_size=BLOCK_SIZE)
        self.kv: dict[int, tuple] = {}
        self.registered: dict[bytes, tuple] = {}  # block hash -> the KV its block held when registered
        self.waiting: dict[int, FakeSeq] = {}
        self.running: dict[int, FakeSeq] = {}
        self.next_seq_id = 0
        self.counts: Counter[str] = Counter()

    def slot(self, seq: FakeSeq, position: int) -> int:
        return self.manager.block_table(seq.seq_id)[position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE

    def check_kv_readable(self, seq: FakeSeq, num_tokens: int) -> None:
        for position in range(num_tokens):
            assert self.kv.get(self.slot(seq, position)) == (seq.extra_key, tuple(seq.token_ids[:position + 1]))

    def compute(self, seq: FakeSeq, token_ids: list[int], num_new_tokens: int) -> None:
        """The forward pass: attention reads the computed prefix, then writes KV of the new tokens."""
        self.check_kv_readable(seq, seq.num_computed_tokens)
        pool, table = self.manager.block_pool, self.manager.block_table(seq.seq_id)
        for position in range(seq.num_computed_tokens, seq.num_computed_tokens + num_new_tokens):
            block_id = table[position // BLOCK_SIZE]
            assert pool.ref_count(block_id) == 1 and pool.block_hash(block_id) is None, "write into shared KV"
            self.kv[self.slot(seq, position)] = (seq.extra_key, tuple(token_ids[:position + 1]))

    def cache(self, seq: FakeSeq) -> None:
        self.manager.cache_full_blocks(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
        for block_id in self.manager.block_table(seq.seq_id):
            block_hash = self.manager.block_pool.block_hash(block_id)
            if block_hash is not None and block_hash not in self.registered:
                self.registered[block_hash] = self.block_kv(block_id)

    def block_kv(self, block_id: int) -> tuple:
        return tuple(self.kv.get(block_id * BLOCK_SIZE + offset) for offset in range(BLOCK_SIZE))

    def arrive(self) -> None:
        prompt = list(self.rng.choice(self.PREFIXES)) + [self.rng.randrange(50) for _ in range(self.rng.randint(0, 6))]
        extra_key = self.rng.choice([None, None, None, ("lora", "a")])
        self.waiting[self.next_seq_id] = FakeSeq(self.next_seq_id, prompt, extra_key)
        self.next_seq_id += 1

    def admit(self, seq: FakeSeq) -> None:
        computed, num_computed = self.manager.get_computed_blocks(seq.seq_id, seq.token_ids, seq.extra_key)
        assert num_computed % BLOCK_SIZE == 0 and num_computed <= len(seq.token_ids) - 1
        num_new_tokens = self.rng.randint(1, len(seq.token_ids) - num_computed)  # chunked prefill
        if self.manager.allocate_slots(seq.seq_id, num_new_tokens, computed) is None:
            self.counts["admission_refused"] += 1
            return
        self.counts["hit_tokens"] += num_computed
        del self.waiting[seq.seq_id]
        self.running[seq.seq_id] = seq
        seq.num_computed_tokens = num_computed
        self.run_tokens(seq, num_new_tokens)

    def run_tokens(self, seq: FakeSeq, num_new_tokens: int) -> None:
        self.compute(seq, seq.token_ids, num_new_tokens)
        seq.num_computed_tokens += num_new_tokens
        self.cache(seq)
        if seq.num_computed_tokens == len(seq.token_ids):  # logits of the last token: sample one
            seq.token_ids.append(self.rng.randrange(50))

    def step(self, seq: FakeSeq) -> None:
        assert self.manager.num_tokens(seq.seq_id) == seq.num_computed_tokens
        num_drafts = self.rng.randint(1, 4) if self.rng.random() < 0.3 else 0
        num_uncomputed = len(seq.token_ids) - seq.num_computed_tokens
        if num_drafts and num_uncomputed == 1:
            self.speculate(seq, num_drafts)
        else:
            num_new_tokens = self.rng.randint(1, num_uncomputed)
            if self.allocate_or_preempt(seq, num_new_tokens):
                self.run_tokens(seq, num_new_tokens)

    def speculate(self, seq: FakeSeq, num_drafts: int) -> None:
        """Verify k drafts in one pass, accept a prefix of them plus one bonus token, roll back the rest."""
        if not self.allocate_or_preempt(seq, 1 + num_drafts):
            return
        drafts = [self.rng.randrange(50) for _ in range(num_drafts)]
        self.compute(seq, seq.token_ids + drafts, 1 + num_drafts)
        num_accepted = self.rng.randint(0, num_drafts)
        seq.token_ids += drafts[:num_accepted] + [self.rng.randrange(50)]
        seq.num_computed_tokens += 1 + num_accepted
        self.manager.truncate(seq.seq_id, seq.num_computed_tokens)
        self.cache(seq)
        self.counts["spec_steps"] += 1

    def allocate_or_preempt(self, seq: FakeSeq, num_new_tokens: int) -> bool:
        if self.manager.allocate_slots(seq.seq_id, num_new_tokens) is not None:
            return True
        victims = [s for s in self.running.values() if s is not seq]
        self.preempt(self.rng.choice(victims) if victims else seq)
        return False

    def preempt(self, seq: FakeSeq) -> None:
        self.manager.free(seq.seq_id)  # recompute later: back to waiting, nothing computed
        del self.running[seq.seq_id]
        seq.num_computed_tokens = 0
        self.waiting[seq.seq_id] = seq
        self.counts["preempted"] += 1

    def fork(self, parent: FakeSeq) -> None:
        child = FakeSeq(self.next_seq_id, parent.token_ids[:-1] + [self.rng.randrange(50)], parent.extra_key,
                        parent.num_computed_tokens)
        try:
            copy = self.manager.fork(parent.seq_id, child.seq_id)
        except NoFreeBlocksError:
            return
        self.next_seq_id += 1
        assert (copy is None) == (parent.num_computed_tokens % BLOCK_SIZE == 0)
        if copy is not None:  # the runner's copy-on-write
            for offset in range(BLOCK_SIZE):
                self.kv[copy.dst_block_id * BLOCK_SIZE + offset] = self.kv.get(copy.src_block_id * BLOCK_SIZE + offset)
        self.running[child.seq_id] = child
        self.counts["forks"] += 1

    def leave(self, seq: FakeSeq, why: str) -> None:
        self.manager.free(seq.seq_id)  # finished, aborted (maybe still waiting) or failed: all the same
        self.running.pop(seq.seq_id, None)
        self.waiting.pop(seq.seq_id, None)
        self.counts[why] += 1
        self.counts["lifecycles"] += 1

    def random_op(self) -> None:
        rng = self.rng
        live = list(self.running.values()) + list(self.waiting.values())
        op = rng.choices(["arrive", "admit", "step", "fork", "leave", "preempt"], [3, 4, 12, 1, 2, 1])[0]
        if op == "arrive" and len(live) < 10 or not live:
            self.arrive()
        elif op == "admit" and self.waiting:
            self.admit(rng.choice(list(self.waiting.values())))
        elif op == "step" and self.running:
            seq = rng.choice(list(self.running.values()))
            if len(seq.token_ids) >= self.MAX_NUM_TOKENS:
                self.leave(seq, "finished")
            else:
                self.step(seq)
        elif op == "fork" and (parents := [s for s in self.running.values()
                                            if len(s.token_ids) - s.num_computed_tokens == 1]):
            self.fork(rng.choice(parents))  # between steps: all but the just-sampled token computed
        elif op == "leave":
            self.leave(rng.choice(live), rng.choice(["finished", "aborted", "failed"]))
        elif op == "preempt" and self.running:
            self.preempt(rng.choice(list(self.running.values())))

    def check_invariants(self) -> None:
        manager, pool = self.manager, self.manager.block_pool
        pool.check_invariants()  # free xor cached xor used; hash index consistent both ways
        assert set(manager.seq_ids) == set(self.running)
        references = Counter(b for seq_id in manager.seq_ids for b in manager.block_table(seq_id))
        assert all(pool.ref_count(b) == references[b] for b in range(pool.num_blocks))
        assert sum(pool.ref_count(b) for b in range(pool.num_blocks)) == sum(references.values())
        assert manager.usage == len(references) / pool.num_blocks  # exact, not approximately
        assert manager.num_free_blocks == pool.num_blocks - len(references)
        for seq in self.running.values():
            assert manager.num_tokens(seq.seq_id) == seq.num_computed_tokens
            assert len(manager.block_table(seq.seq_id)) == -(-seq.num_computed_tokens // BLOCK_SIZE)
        for block_id in range(pool.num_blocks):
            block_hash = pool.block_hash(block_id)
            if block_hash is not None:
                assert pool.cached_block_id(block_hash) == block_id
                assert self.block_kv(block_id) == self.registered[block_hash], "cached KV was overwritten"


@pytest.mark.parametrize("seed", [0, 1])
def test_random_lifecycles_keep_every_invariant_and_return_every_block(seed: int) -> None:
    sim = Simulation(seed)
    while sim.counts["lifecycles"] < 1500:
        sim.random_op()
        sim.check_invariants()
    for seq in list(sim.running.values()) + list(sim.waiting.values()):
        sim.leave(seq, "shutdown")
        sim.check_invariants()
    manager, pool = sim.manager, sim.manager.block_pool
    assert manager.seq_ids == [] and manager.usage == 0
    assert manager.num_free_blocks == pool.num_blocks  # free + evictable cached == all of them
    assert all(pool.ref_count(b) == 0 for b in range(pool.num_blocks))
    # The workload must actually have exercised the paths the invariants guard.
    for event in ("preempted", "forks", "spec_steps", "aborted", "failed", "admission_refused", "hit_tokens"):
        assert sim.counts[event] > 0, event
    assert pool.num_evictions > 0 and manager.prefix_cache_stats.num_hit_tokens == sim.counts["hit_tokens"]
