"""Both runners of the onnxruntime engine decode like the native engine while requests join and leave the batch
(more prompts than slots, of different lengths: the batched runner's caches are left-padded and repacked)."""

from __future__ import annotations

import random

import pytest

from serve.backends.onnxruntime_engine import OrtEngine
from serve.types import SamplingParams
from tests.serve.api.conftest import engine_config


@pytest.fixture(scope="module")
def prompts_and_reference(trained_checkpoint):
    from serve.engine.llm_engine import LLMEngine

    rng = random.Random(0)
    native = LLMEngine(engine_config(trained_checkpoint))
    texts = ["class collections.OrderedDict", "Return the", "os.path.join(a, *p)", "def main():\n    import os\n"]
    prompts = [native.tokenizer.encode(texts[i % 4], add_special_tokens=False)[: rng.randrange(2, 12)]
               + [rng.randrange(16, 512) for _ in range(rng.randrange(0, 30))] for i in range(9)]
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    return prompts, [list(o.outputs[0].token_ids) for o in native.generate(prompts, greedy)]


@pytest.mark.parametrize("runner", ["batched", "genai"])
def test_runner_greedy_equals_native_with_joins_and_leaves(onnx_fp32, prompts_and_reference, runner):
    prompts, expected = prompts_and_reference
    engine = OrtEngine(onnx_fp32, max_num_seqs=4, runner=runner)
    # Different max_tokens: sequences leave at different steps, and the waiting ones join mid-batch.
    params = [SamplingParams(temperature=0.0, max_tokens=4 + i % 7, ignore_eos=True) for i in range(len(prompts))]
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", prompt, p)
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id].extend(t for c in out.outputs for t in c.token_ids)
    assert [got[f"r{i}"] for i in range(len(prompts))] == [ref[:p.max_tokens] for ref, p in zip(expected, params)]
    assert engine.stats().num_running == 0


def test_padded_prompts_left_pad_with_each_rows_own_positions():
    from serve.backends.onnxruntime_runners import padded_prompts

    ids, mask, positions = padded_prompts([[5, 6, 7], [9]])
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_one_padded_prefill_equals_prefills_one_at_a_time(onnx_fp32, prompts_and_reference):
    """The joiners' prompts in one left-padded call: the same logits and caches as each prompt alone."""
    import numpy as np

    from serve.backends.onnxruntime_runners import BatchedRunner

    prompts = prompts_and_reference[0][:5]
    runner = BatchedRunner(onnx_fp32, OrtEngine(onnx_fp32).config)
    together = runner.prefill([(f"s{i}", p, 64) for i, p in enumerate(prompts)])
    assert np.isfinite(together).all()
    for i, prompt in enumerate(prompts):
        alone, cache = runner.decoder.forward(np.asarray([prompt]), None)
        np.testing.assert_allclose(together[i], alone[0, -1], atol=2e-4)
        for mine, theirs in zip(runner._pending[f"s{i}"], cache):
            assert mine.shape == theirs.shape
            np.testing.assert_allclose(mine, theirs, atol=2e-4)


def test_staggered_arrivals_join_in_one_prefill_and_decode_like_native(onnx_fp32, prompts_and_reference):
    """Requests arrive in waves while others decode; each wave is prefilled in one call; greedy = native."""
    prompts, expected = prompts_and_reference
    engine = OrtEngine(onnx_fp32, max_num_seqs=16, runner="batched")
    calls: list[int] = []
    prefill = engine.runner.prefill
    engine.runner.prefill = lambda items: calls.append(len(items)) or prefill(items)
    waves = {0: [0, 1], 2: [2, 3, 4], 3: [5], 6: [6, 7, 8]}  # step -> requests added before it
    params = [SamplingParams(temperature=0.0, max_tokens=4 + i % 7, ignore_eos=True) for i in range(len(prompts))]
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    step = 0
    while step <= max(waves) or engine.has_unfinished_requests():
        for i in waves.get(step, []):
            engine.add_request(f"r{i}", prompts[i], params[i])
        for out in engine.step():
            got[out.request_id].extend(t for c in out.outputs for t in c.token_ids)
        step += 1
    assert calls == [2, 3, 1, 3]
    assert [got[f"r{i}"] for i in range(len(prompts))] == [ref[:p.max_tokens] for ref, p in zip(expected, params)]
    assert engine.stats().num_running == 0
