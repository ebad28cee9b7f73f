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
