"""The engine against transformers: greedy tokens equal `generate` for mixed batches, with prefix
caching, chunked prefill and preemption; prompt logprobs equal log_softmax of HF logits; every KV
block returns to the pool. Bad requests: test_admission.py; n > 1: test_parallel_sampling.py."""

from __future__ import annotations

import pytest
import torch

from serve.engine.llm_engine import EngineConfig, LLMEngine
from serve.types import FinishReason, SamplingParams

PROMPTS = [
    "os.path.join(a, *p)\n\nJoin two or more pathname components",
    "class collections.OrderedDict",
    "Return",
    "The socket module provides access to the BSD socket interface, which is available on all modern Unix "
    "systems, Windows, MacOS, and probably additional platforms.",
    "json.dumps(obj, *, skipkeys=False, ensure_ascii=True)\n\nSerialize",
]
GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def hf_model(trained_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(trained_checkpoint).eval(), AutoTokenizer.from_pretrained(trained_checkpoint)


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    model, _ = hf_model
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    return out.sequences[0, len(prompt_ids):].tolist(), torch.stack(out.logits)[:, 0]


def assert_same_greedy(hf_model, engine: LLMEngine, prompts, outputs, max_new_tokens=20) -> None:
    """Token-for-token equality; a difference is only tolerated at a genuine near-tie of HF's logits
    (top-2 margin < 1e-4), and the margin is shown."""
    for prompt, out in zip(prompts, outputs):
        ids = engine.tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else prompt
        ref, logits = hf_greedy(hf_model, ids, max_new_tokens)
        got = list(out.outputs[0].token_ids)
        if got != ref:
            pos = next(i for i, (a, b) in enumerate(zip(got, ref)) if a != b)
            top2 = logits[pos].topk(2).values
            margin = float(top2[0] - top2[1])
            assert margin < 1e-4, f"prompt {prompt!r}: first difference at token {pos}, HF top-2 margin {margin}"


# Parity tests pin fp32 on every device: the engine defaults to bf16 on CUDA, whose rounding is not HF fp32.
def make_engine(path, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), **{"dtype": "float32", **kw}))


def assert_pool_empty(engine: LLMEngine) -> None:
    assert not engine.has_unfinished_requests()
    assert engine.kv.usage == 0.0
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    engine.kv.block_pool.check_invariants()


def test_greedy_matches_transformers_mixed_batch(trained_checkpoint, hf_model):
    engine = make_engine(trained_checkpoint, enable_prefix_caching=False)
    outs = engine.generate(PROMPTS, GREEDY)
    assert all(o.outputs[0].finish_reason is FinishReason.LENGTH and len(o.outputs[0].token_ids) == 20 for o in outs)
    assert_same_greedy(hf_model, engine, PROMPTS, outs)
    assert_pool_empty(engine)


def test_prefix_caching_reuses_blocks_and_keeps_outputs(trained_checkpoint, hf_model):
    engine = make_engine(trained_checkpoint, block_size=4)
    system = PROMPTS[3] + " " + PROMPTS[0]
    prompts = [system + " Question one?", system + " Another question", system]
    first = engine.generate(prompts[:1], GREEDY)
    rest = engine.generate(prompts[1:], GREEDY)
    assert first[0].num_cached_tokens == 0
    assert all(o.num_cached_tokens >= 4 * (len(engine.tokenizer.encode(system)) // 4 - 1) for o in rest)
    assert engine.stats().prefix_cache_hits_tokens > 0
    assert_same_greedy(hf_model, engine, prompts, first + rest)
    assert_pool_empty(engine)


def test_chunked_prefill_matches(trained_checkpoint, hf_model):
    engine = make_engine(trained_checkpoint, max_num_batched_tokens=8, enable_prefix_caching=False)
    outs = engine.generate(PROMPTS, GREEDY)
    assert_same_greedy(hf_model, engine, PROMPTS, outs)
    assert_pool_empty(engine)


def test_preemption_recomputes_and_matches(trained_checkpoint, hf_model):
    engine = make_engine(trained_checkpoint, block_size=4, num_kv_blocks=40)
    outs = engine.generate(PROMPTS, GREEDY)
    assert engine.scheduler.num_preemptions_total > 0
    assert_same_greedy(hf_model, engine, PROMPTS, outs)
    assert_pool_empty(engine)


def test_prompt_logprobs_equal_hf_log_softmax(trained_checkpoint, hf_model):
    engine = make_engine(trained_checkpoint, max_num_batched_tokens=8)  # chunked: logprobs arrive per chunk
    ids = engine.tokenizer.encode(PROMPTS[3], add_special_tokens=False)
    out = engine.generate([ids], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=3, logprobs=2))[0]
    model, _ = hf_model
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].log_softmax(-1)  # (len, vocab)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for pos in range(1, len(ids)):
        lp = out.prompt_logprobs[pos]
        assert lp.chosen.token_id == ids[pos]
        assert lp.chosen.logprob == pytest.approx(float(ref[pos - 1, ids[pos]]), abs=1e-4)
        assert [t.token_id for t in lp.top] == ref[pos - 1].topk(3).indices.tolist()
    gen = out.outputs[0].logprobs[0]
    assert gen.chosen.rank == 1 and len(gen.top) == 2  # greedy picks the most likely token
    assert_pool_empty(engine)


def test_prompt_logprobs_start_lets_the_context_come_from_the_prefix_cache(trained_checkpoint, hf_model):
    """Scoring needs logprobs of the continuation only: a second choice after the same context reuses the
    context's cached blocks, and the scored tokens' logprobs still equal HF's log-softmax. Without
    prompt_logprobs_start (0) a request with prompt logprobs never touches the cache."""
    engine = make_engine(trained_checkpoint, block_size=4)
    context = engine.tokenizer.encode(PROMPTS[3] + " " + PROMPTS[1], add_special_tokens=False)
    assert len(context) >= 12
    choices = [engine.tokenizer.encode(" yes it does", add_special_tokens=False),
               engine.tokenizer.encode(" no never", add_special_tokens=False)]
    model, _ = hf_model
    for i, choice in enumerate(choices):
        ids = context + choice
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, prompt_logprobs_start=len(context))
        out = engine.generate([ids], params)[0]
        assert len(out.prompt_logprobs) == len(ids)
        expected_cached = 0 if i == 0 else (len(context) - 1) // 4 * 4  # full blocks before the first scored token
        assert out.num_cached_tokens == expected_cached
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].log_softmax(-1)  # (len, vocab)
        for pos in range(len(context), len(ids)):
            assert out.prompt_logprobs[pos].chosen.logprob == pytest.approx(float(ref[pos - 1, ids[pos]]), abs=1e-4)
        if i:
            assert all(lp is None for lp in out.prompt_logprobs[:expected_cached + 1])
    everything = engine.generate([context + choices[1]], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    assert everything.num_cached_tokens == 0 and all(lp is not None for lp in everything.prompt_logprobs[1:])
    with pytest.raises(Exception, match="prompt_logprobs_start"):
        SamplingParams(prompt_logprobs=0, prompt_logprobs_start=-1)


def test_abort_frees_blocks_immediately(trained_checkpoint):
    engine = make_engine(trained_checkpoint)
    engine.add_request("a", PROMPTS[3], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", PROMPTS[0], SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.kv.usage > 0
    assert engine.abort_request("a")
    while engine.has_unfinished_requests():
        engine.step()
    assert_pool_empty(engine)
    assert [r.finish_reason for r in engine.stats().finished_requests] == [FinishReason.ABORT, FinishReason.LENGTH]


def test_stops_seeds_and_n(trained_checkpoint):
    engine = make_engine(trained_checkpoint)
    free = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0].outputs[0]
    stop_id = free.token_ids[3]
    by_id = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop_id]))[0].outputs[0]
    assert by_id.finish_reason is FinishReason.STOP and by_id.token_ids[-1] == stop_id
    assert len(by_id.token_ids) == free.token_ids.index(stop_id) + 1
    stop = free.text[4:8]
    if stop.strip():
        by_str = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=0.0, stop=[stop],
                                                                 ignore_eos=True))[0].outputs[0]
        assert by_str.finish_reason is FinishReason.STOP_STRING and stop not in by_str.text
        assert free.text.startswith(by_str.text)
    sampled = SamplingParams(max_tokens=10, temperature=1.0, seed=7, n=2, ignore_eos=True)
    a = engine.generate([PROMPTS[1]], sampled)[0]
    b = engine.generate([PROMPTS[1]], sampled)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]  # seeded: reproducible
    assert len(a.outputs) == 2 and a.outputs[0].token_ids != a.outputs[1].token_ids
    assert_pool_empty(engine)
