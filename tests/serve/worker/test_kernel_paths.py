"""The engine gives the same tokens and logprobs on both CPU paths: our C kernels and plain torch ops."""

from __future__ import annotations

import torch

from serve.engine.llm_engine import EngineConfig, LLMEngine
from serve.types import SamplingParams

PROMPTS = ["import os\n\ndef main():", "The socket module provides access to the BSD socket interface", "Return"]


def test_kernels_and_torch_ops_agree(trained_checkpoint):
    engines = {k: LLMEngine(EngineConfig(model=str(trained_checkpoint), dtype="float32", device="cpu",
                                         use_cpu_kernels=k, max_num_batched_tokens=24))  # chunked prefill too
               for k in (True, False)}
    if engines[True].runner.model.kernels is None:
        import pytest

        pytest.skip(f"no CPU kernels here: {engines[True].runner.model.kernel_path}")
    assert "torch ops" in engines[False].runner.model.kernel_path
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    outs = {k: e.generate(PROMPTS, params) for k, e in engines.items()}
    for a, b in zip(outs[True], outs[False]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        got = torch.tensor([lp.chosen.logprob for lp in a.outputs[0].logprobs])
        ref = torch.tensor([lp.chosen.logprob for lp in b.outputs[0].logprobs])
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)  # fp32, different summation order
        got_p = torch.tensor([lp.chosen.logprob for lp in a.prompt_logprobs[1:]])
        ref_p = torch.tensor([lp.chosen.logprob for lp in b.prompt_logprobs[1:]])
        torch.testing.assert_close(got_p, ref_p, atol=1e-4, rtol=0)
    # Sampling with a seed: the same draws on both paths (the logits agree to fp32 noise).
    sampled = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    assert ([o.outputs[0].token_ids for o in engines[True].generate(PROMPTS, sampled)]
            == [o.outputs[0].token_ids for o in engines[False].generate(PROMPTS, sampled)])


def test_one_call_forward_equals_the_per_op_kernel_path(trained_checkpoint):
    """Steps of few rows run every layer in one C call (lmf_forward_few_rows_f32); it performs the per-op kernel
    path's operations in the same order, so hidden states agree bit for bit: single decode, two sequences,
    speculative-style multi-token chunks after cached context."""
    from serve.worker import kernels as cpu_kernels
    from serve.worker.model_runner import ModelRunner

    runner = ModelRunner(trained_checkpoint, device="cpu", dtype=torch.float32, num_blocks=64, block_size=4)
    model = runner.model
    if model.kernels is None:
        import pytest

        pytest.skip(f"no CPU kernels here: {model.kernel_path}")
    assert model._layer_ptrs is not None
    calls = {"n": 0}
    real = model.kernels.forward_few_rows

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    model.kernels.forward_few_rows = counting
    tables = [[0, 1, 2, 3], [4, 5, 6, 7]]
    prompt_a, prompt_b = list(range(20, 33)), list(range(40, 47))
    runner.forward([(prompt_a, 0), (prompt_b, 0)], tables)  # prefill: 20 rows, the per-op path
    assert calls["n"] == 0
    steps = [[([7], 13)], [([7], 13), ([9], 7)], [([7, 8, 9], 13), ([9, 10], 7)]]  # (new ids, first position)
    for chunks in steps:
        assert sum(len(ids) for ids, _ in chunks) <= cpu_kernels.MAX_SMALL_M
        fused, _ = runner.forward(chunks, tables[:len(chunks)])
        ptrs, model._layer_ptrs = model._layer_ptrs, None  # the same step on the per-op path
        per_op, _ = runner.forward(chunks, tables[:len(chunks)])
        model._layer_ptrs = ptrs
        assert torch.equal(fused, per_op)
    assert calls["n"] == len(steps)
