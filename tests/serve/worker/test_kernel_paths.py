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


def test_compact_bf16_weights_compute_what_bf16_rounded_weights_do(trained_checkpoint):
    """A draft model's few-row steps may stream bf16 copies of its projections and LM head
    (`compact_few_row_weights`): the kernel widens each weight exactly and sums in fp32, so it must agree with
    the fp32 path run on the same weights rounded to bf16 — and differ from the unrounded model."""
    from serve.worker.model_runner import ModelRunner

    def runner():
        return ModelRunner(trained_checkpoint, device="cpu", dtype=torch.float32, num_blocks=64, block_size=4)

    compact, rounded, plain = runner(), runner(), runner()
    if compact.model.kernels is None:
        import pytest

        pytest.skip(f"no CPU kernels here: {compact.model.kernel_path}")
    assert compact.model.compact_few_row_weights()
    assert "bf16" in compact.model.kernel_path
    for layer in rounded.model.layers:  # in place: the one-call forward reads these addresses
        for w in (layer.qkv, layer.o, layer.gate_up, layer.down):
            w.copy_(w.to(torch.bfloat16).float())
    tables = [[0, 1, 2, 3], [4, 5, 6, 7]]
    steps = [[([20, 21, 22], 0), ([40, 41], 0)], [([7], 3), ([9], 2)], [([7, 8, 9], 4), ([9, 10], 3)]]
    for chunks in steps:  # every step <= 8 rows: the one-call forward from the first token on
        got, _ = compact.forward(chunks, tables)
        ref, _ = rounded.forward(chunks, tables)
        far, _ = plain.forward(chunks, tables)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, far, atol=1e-5, rtol=1e-5)
        lm_head = rounded.model.lm_head.to(torch.bfloat16).float()
        torch.testing.assert_close(compact.model.logits(got), got @ lm_head.T, atol=1e-4, rtol=1e-5)


def test_onednn_packed_weights_for_batched_steps(trained_checkpoint):
    """Steps of 9-256 rows run the fp32 projections and the LM head on oneDNN-packed copies: the same values as
    F.linear up to summation order; fewer rows (our C kernels) and more (prefill chunks: F.linear) are untouched
    bit for bit; and an engine with them gives the same greedy tokens and logprobs as one without."""
    from serve.worker.llama import PACKED_MAX_ROWS
    from serve.worker.model_runner import ModelRunner

    packed = ModelRunner(trained_checkpoint, device="cpu", dtype=torch.float32, num_blocks=16).model
    plain = ModelRunner(trained_checkpoint, device="cpu", dtype=torch.float32, num_blocks=16,
                        packed_weights=False).model
    if packed.kernels is None or not packed._packed:
        import pytest

        pytest.skip(f"no CPU kernels or no oneDNN here: {packed.kernel_path}")
    assert "oneDNN-packed" in packed.kernel_path and not plain._packed and "oneDNN" not in plain.kernel_path
    layer = packed.layers[0]
    assert layer.qkv.data_ptr() in packed._packed and packed.lm_head.data_ptr() in packed._packed
    torch.manual_seed(0)
    pairs = [(packed.lm_head, plain.lm_head)] + [(getattr(layer, n), getattr(plain.layers[0], n))
                                                  for n in ("qkv", "o", "gate_up", "down")]
    for rows in (1, 8, 9, 64, PACKED_MAX_ROWS, PACKED_MAX_ROWS + 1):
        for weight, plain_weight in pairs:
            x = torch.randn(rows, weight.shape[1])
            got, ref = packed._linear(x, weight), plain._linear(x, plain_weight)
            if 8 < rows <= PACKED_MAX_ROWS:
                torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
            else:
                assert torch.equal(got, ref)
    prompts = [f"def f{i}(x):\n    return" for i in range(12)]  # 12 decodes per step; a prefill of ~100 rows
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1)
    outs = [LLMEngine(EngineConfig(model=str(trained_checkpoint), cpu_packed_weights=p)).generate(prompts, params)
            for p in (True, False)]
    for a, b in zip(*outs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        torch.testing.assert_close(torch.tensor([lp.chosen.logprob for lp in a.outputs[0].logprobs]),
                                   torch.tensor([lp.chosen.logprob for lp in b.outputs[0].logprobs]), atol=1e-4, rtol=0)
