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
