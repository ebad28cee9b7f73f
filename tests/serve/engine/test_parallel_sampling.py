"""n > 1 through the engine: the prompt is computed once and its KV blocks are shared by the n
completions (full blocks ref-counted, the partial last block copied), outputs equal n = 1 runs, and
every block returns to the pool after finish, abort and preemption (serve/engine/parallel_sampling.py)."""

from __future__ import annotations

from collections import Counter

import pytest

from serve.engine.llm_engine import EngineConfig, LLMEngine
from serve.types import FinishReason, SamplingParams

BLOCK_SIZE = 4
TEXT = ("The socket module provides access to the BSD socket interface, which is available on all modern Unix "
        "systems, Windows, MacOS, and probably additional platforms.")
GREEDY = dict(temperature=0.0, ignore_eos=True, repetition_penalty=1.3)  # penalized: varied output


def make_engine(path, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), block_size=BLOCK_SIZE, **kw))


@pytest.fixture(scope="module")
def prompt_ids(trained_checkpoint) -> list[int]:
    ids = make_engine(trained_checkpoint, num_kv_blocks=64).tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(ids) >= 32
    return ids


@pytest.fixture(scope="module")
def reference(trained_checkpoint, prompt_ids):
    """n = 1 outputs on a roomy engine: greedy for prompt lengths 30 and 32, and seeded sampled."""
    engine = make_engine(trained_checkpoint)
    greedy = {p: engine.generate([prompt_ids[:p]], SamplingParams(max_tokens=12, logprobs=2, **GREEDY))[0].outputs[0]
              for p in (30, 32)}
    seeded = [engine.generate([prompt_ids[:30]], SamplingParams(max_tokens=10, seed=7 + i))[0].outputs[0].token_ids
              for i in range(4)]
    return greedy, seeded


def count_computed_tokens(engine: LLMEngine) -> list[int]:
    """Record the tokens each forward pass computes (prompt chunks, decode tokens)."""
    counts: list[int] = []
    execute = engine.runner.execute

    def spy(sched, block_tables, wants_prompt_logits):
        counts.append(sched.num_tokens)
        return execute(sched, block_tables, wants_prompt_logits)

    engine.runner.execute = spy
    return counts


def assert_ref_counts_are_table_counts(engine: LLMEngine) -> None:
    """Every block's ref count is the number of block tables holding it: nothing leaked, nothing freed early."""
    held = Counter(b for seq_id in engine.kv.seq_ids for b in engine.kv.block_table(seq_id))
    pool = engine.kv.block_pool
    assert {b: pool.ref_count(b) for b in range(pool.num_blocks) if pool.ref_count(b)} == dict(held)
    pool.check_invariants()


def assert_pool_empty(engine: LLMEngine) -> None:
    assert not engine.has_unfinished_requests() and not engine.prompt_sharing._siblings
    assert engine.stats().kv_cache_usage == 0.0 and engine.kv.num_free_blocks == engine.kv.num_blocks
    engine.kv.block_pool.check_invariants()


def run(engine: LLMEngine, request_id: str, prompt, params: SamplingParams, check_each_step=False):
    engine.add_request(request_id, prompt, params)
    outputs: dict[int, list[int]] = {}
    while engine.has_unfinished_requests():
        for ro in engine.step():
            for c in ro.outputs:
                outputs.setdefault(c.index, []).extend(c.token_ids)
        if check_each_step:
            assert_ref_counts_are_table_counts(engine)
    return [tuple(outputs[i]) for i in sorted(outputs)]


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
@pytest.mark.parametrize("num_prompt_tokens", [30, 32])  # ends inside a block / on a block boundary
def test_prompt_is_computed_once_and_its_blocks_shared(trained_checkpoint, prompt_ids,
                                                       enable_prefix_caching, num_prompt_tokens):
    engine = make_engine(trained_checkpoint, enable_prefix_caching=enable_prefix_caching)
    computed = count_computed_tokens(engine)
    prompt, max_tokens = prompt_ids[:num_prompt_tokens], 12
    engine.add_request("r", prompt, SamplingParams(n=4, max_tokens=max_tokens, **GREEDY))
    first = engine.step()  # the prompt's forward pass; every completion gets its first token from it
    assert computed == [num_prompt_tokens] and sorted(c.index for c in first[0].outputs) == [0, 1, 2, 3]
    num_full, has_partial = divmod(num_prompt_tokens, BLOCK_SIZE)
    tables = [engine.kv.block_table(f"r#{i}") for i in range(4)]
    assert all(t[:num_full] == tables[0][:num_full] for t in tables)  # full blocks shared ...
    assert all(engine.kv.block_pool.ref_count(b) == 4 for b in tables[0][:num_full])
    assert len({t[-1] for t in tables}) == (4 if has_partial else 1)  # ... the partial one copied
    num_used = num_full + 4 * (1 if has_partial else 0)
    assert engine.kv.block_pool.num_used_blocks == num_used < 4 * len(tables[0])
    assert_ref_counts_are_table_counts(engine)

    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs[-1].finished and all(c.finish_reason is FinishReason.LENGTH for c in outputs[-1].outputs)
    # once the prompt, then each completion computes its own tokens but the last
    assert sum(computed) == num_prompt_tokens + 4 * (max_tokens - 1)
    stats = engine.stats()
    assert stats.num_prompt_tokens_total == num_prompt_tokens
    assert stats.prefix_cache_queries_tokens == (num_prompt_tokens if enable_prefix_caching else 0)
    assert engine.prompt_sharing.num_forks_total == 3
    assert_pool_empty(engine)


@pytest.mark.parametrize("num_prompt_tokens", [30, 32])
def test_greedy_n4_gives_four_copies_of_n1(trained_checkpoint, prompt_ids, reference, num_prompt_tokens):
    engine = make_engine(trained_checkpoint)
    params = SamplingParams(n=4, max_tokens=12, logprobs=2, **GREEDY)
    out = engine.generate([prompt_ids[:num_prompt_tokens]], params)[0]
    ref = reference[0][num_prompt_tokens]
    assert [c.token_ids for c in out.outputs] == [ref.token_ids] * 4
    assert len({c.text for c in out.outputs}) == 1
    # The logprobs see every prompt position's KV: a partial block forked without its copy (the last
    # prompt tokens' KV missing) shifts them even where the argmax survives.
    for c in out.outputs:
        assert [lp.chosen.logprob for lp in c.logprobs] == pytest.approx([lp.chosen.logprob for lp in ref.logprobs],
                                                                         abs=1e-4)
    assert_pool_empty(engine)


def test_seeded_sampled_n_is_reproducible_and_completion_i_draws_from_seed_plus_i(trained_checkpoint, prompt_ids,
                                                                                 reference):
    engine = make_engine(trained_checkpoint)
    params = SamplingParams(n=4, max_tokens=10, seed=7)
    a = [c.token_ids for c in engine.generate([prompt_ids[:30]], params)[0].outputs]
    b = [c.token_ids for c in engine.generate([prompt_ids[:30]], params)[0].outputs]
    assert a == b and len(set(a)) > 1
    assert a == reference[1]  # completion i is what n = 1 with seed 7 + i gives: sharing changes no draw
    assert_pool_empty(engine)


def test_abort_before_and_after_the_fork_frees_every_block(trained_checkpoint, prompt_ids):
    engine = make_engine(trained_checkpoint, max_num_batched_tokens=8)  # the prompt takes 4 chunked steps
    engine.add_request("other", prompt_ids[:5], SamplingParams(max_tokens=30, **GREEDY))
    engine.add_request("early", prompt_ids[:30], SamplingParams(n=4, max_tokens=20, **GREEDY))
    engine.step()
    assert engine.prompt_sharing._siblings and engine.kv.seq_ids == ["other#0", "early#0"]
    snapshot = engine.stats()  # stats() hands over the finished requests: keep them for the end
    finished_stats = list(snapshot.finished_requests)
    assert snapshot.num_waiting == 3  # the siblings waiting for the prompt count as waiting
    assert engine.abort_request("early")  # siblings still waiting for the prompt
    assert not engine.prompt_sharing._siblings and engine.kv.seq_ids == ["other#0"]
    snapshot = engine.stats()
    finished_stats += snapshot.finished_requests
    assert snapshot.num_waiting == 0
    engine.add_request("late", prompt_ids[:30], SamplingParams(n=4, max_tokens=20, **GREEDY))
    while len([s for s in engine.kv.seq_ids if s.startswith("late")]) < 4:
        engine.step()
    engine.step()
    assert_ref_counts_are_table_counts(engine)
    assert engine.abort_request("late")  # forked, decoding
    assert engine.kv.seq_ids == ["other#0"]
    while engine.has_unfinished_requests():  # the other request is undisturbed
        engine.step()
    finished = {(r.request_id, r.finish_reason) for r in finished_stats + engine.stats().finished_requests}
    assert finished == {("other", FinishReason.LENGTH), ("early", FinishReason.ABORT), ("late", FinishReason.ABORT)}
    assert_pool_empty(engine)


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_preempting_siblings_leaves_the_others_intact(trained_checkpoint, prompt_ids, reference,
                                                     enable_prefix_caching):
    # 30-token prompt: 7 shared full blocks + 4 partial copies after the fork; 4 x 12 tokens need 12 more
    # blocks than the 18 there are, so the latest siblings are preempted (and recompute) along the way.
    engine = make_engine(trained_checkpoint, num_kv_blocks=18, enable_prefix_caching=enable_prefix_caching)
    outputs = run(engine, "r", prompt_ids[:30], SamplingParams(n=4, max_tokens=12, **GREEDY), check_each_step=True)
    assert engine.scheduler.num_preemptions_total > 0
    assert outputs == [reference[0][30].token_ids] * 4
    assert_pool_empty(engine)


@pytest.mark.parametrize("engine_kwargs", [dict(max_num_seqs=2), dict(num_kv_blocks=8)],
                         ids=["max_num_seqs", "no_free_block_for_the_copy"])
def test_siblings_that_cannot_fork_recompute_their_prompt(trained_checkpoint, prompt_ids, engine_kwargs):
    engine = make_engine(trained_checkpoint, **engine_kwargs)
    max_tokens = min(12, engine.max_model_len - 30)  # 8 blocks of 4 hold 32 tokens: 2 generated
    ref = make_engine(trained_checkpoint).generate([prompt_ids[:30]], SamplingParams(max_tokens=max_tokens, **GREEDY))
    outputs = run(engine, "r", prompt_ids[:30], SamplingParams(n=4, max_tokens=max_tokens, **GREEDY),
                  check_each_step=True)
    assert outputs == [ref[0].outputs[0].token_ids] * 4
    forks, unshared = engine.prompt_sharing.num_forks_total, engine.prompt_sharing.num_unshared_total
    assert (forks, unshared) == ((1, 2) if "max_num_seqs" in engine_kwargs else (0, 3))
    assert_pool_empty(engine)


def test_completions_finishing_at_their_first_token_release_the_shared_prompt(trained_checkpoint, prompt_ids):
    # The parent's finish frees its references right after the fork; the siblings' blocks must survive it.
    engine = make_engine(trained_checkpoint)
    computed = count_computed_tokens(engine)
    out = engine.generate([prompt_ids[:30]], SamplingParams(n=4, max_tokens=1, seed=3))[0]
    assert computed == [30] and out.finished and [len(c.token_ids) for c in out.outputs] == [1] * 4
    assert all(c.finish_reason is FinishReason.LENGTH for c in out.outputs)
    assert_pool_empty(engine)
