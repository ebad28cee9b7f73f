"""Our engine on quantized checkpoints: the low-bit kernel it reports, and greedy output equal to
transformers' on the same checkpoint (fp32 math on the dequantized weights, and the reference libraries).

The exact-parity tests run 4-bit GEMVs of one row on fp32 activations (LMFORGE_Q4_ACTIVATIONS=fp32); the default,
int8-rounded activations for those, is checked against that exact path with a bounded, reported logprob error."""

from __future__ import annotations

import re

import pytest
import torch

from quant.report import load_dequantized
from serve.engine.llm_engine import EngineConfig, LLMEngine
from serve.types import SamplingParams

PROMPTS = ["import os\n\ndef main():", "The socket module provides access to the BSD socket interface", "Return"]
CASES = [("gptq:4:32", dict(act_order=True, sym=False), "int4"),
         ("rtn:3:64", dict(sym=False), "int4"),  # 3-bit codes run on the 4-bit kernel
         ("gptq:4:channel", {}, "int4"),
         ("gptq:8:channel", dict(sym=False), "int8"),  # asymmetric: the rank-1 zero correction
         ("gptq:8:32", {}, "dequantize-on-the-fly"),  # no grouped int8 kernel
         ("int8", {}, "int8"),
         ("nf4", {}, "nf4 weight-only GEMV"),
         # --quantize-lm-head: the engine must run the quantized head, not fall back to the embeddings
         ("gptq:4:32", dict(quantize_lm_head=True), "int4"),
         ("int8", dict(quantize_lm_head=True), "int8"),
         ("nf4", dict(quantize_lm_head=True), "nf4")]


@pytest.fixture(autouse=True)
def exact_q4_activations(monkeypatch):
    """Exact fp32 activations for one-row 4-bit GEMVs unless a test sets otherwise."""
    monkeypatch.setenv("LMFORGE_Q4_ACTIVATIONS", "fp32")


def _engine_greedy(path, tokenizer, use_cpu_kernels=True):
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", device="cpu", max_num_batched_tokens=24,
                                    use_cpu_kernels=use_cpu_kernels))
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=1)
    outs = engine.generate([tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS], params)
    return engine, outs


def _hf_greedy(model, tokenizer):
    res = []
    for p in PROMPTS:
        ids = torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16,
                                 output_logits=True, return_dict_in_generate=True)
        new = out.sequences[0, ids.shape[1]:].tolist()
        lps = [torch.log_softmax(lg[0].float(), -1)[t].item() for lg, t in zip(out.logits, new)]
        res.append((new, lps))
    return res


@pytest.mark.parametrize("spec,overrides,path_name", CASES,
                         ids=[c[0] + ("+lm_head" if c[1].get("quantize_lm_head") else "") for c in CASES])
def test_engine_greedy_equals_transformers_on_dequantized_weights(spec, overrides, path_name, quantized,
                                                                  tiny_checkpoint):
    from transformers import AutoTokenizer

    path = quantized(spec, **overrides)
    tok = AutoTokenizer.from_pretrained(path)
    engine, outs = _engine_greedy(path, tok)
    kernel_path = engine.runner.model.kernel_path
    assert path_name in kernel_path
    # 2 layers x (qkv, o, gate_up, down) fused linears, plus the LM head when it is quantized
    counts = re.findall(r" x(\d+)(?=; |$)", kernel_path)  # "<path> x<count>; <path> x<count>"
    assert sum(map(int, counts)) == 8 + bool(overrides.get("quantize_lm_head"))
    ref = _hf_greedy(load_dequantized(tiny_checkpoint, path), tok)
    for out, (tokens, lps) in zip(outs, ref):
        assert list(out.outputs[0].token_ids) == tokens
        got = torch.tensor([lp.chosen.logprob for lp in out.outputs[0].logprobs])
        # The kernels round activations differently (int4pack: bf16-free fp32 but another summation order).
        torch.testing.assert_close(got, torch.tensor(lps), atol=2e-3, rtol=0)


@pytest.mark.parametrize("spec,overrides", [("gptq:4:32", dict(act_order=True, sym=False)), ("nf4", {}), ("int8", {})],
                         ids=["gptq", "nf4", "int8"])
def test_engine_greedy_equals_transformers_with_the_reference_library(spec, overrides, quantized):
    """transformers + GPTQModel / bitsandbytes on the very same files. LLM.int8 casts activations to fp16 and
    decomposes outliers, so for int8 the per-token logprob error is bounded and reported instead."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pytest.importorskip("gptqmodel" if spec.startswith("gptq") else "bitsandbytes")
    path = quantized(spec, **overrides)
    tok = AutoTokenizer.from_pretrained(path)
    _, outs = _engine_greedy(path, tok)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu").eval()
    ref = _hf_greedy(model, tok)
    worst = 0.0
    for out, (tokens, lps) in zip(outs, ref):
        n = len(tokens)
        if spec != "int8":
            assert list(out.outputs[0].token_ids) == tokens
        else:  # compare up to the first divergence
            same = [a == b for a, b in zip(out.outputs[0].token_ids, tokens)]
            n = same.index(False) if False in same else n
        got = torch.tensor([lp.chosen.logprob for lp in out.outputs[0].logprobs][:n])
        worst = max(worst, float((got - torch.tensor(lps[:n])).abs().max()) if n else 0.0)
    print(f"{spec}: max |logprob(engine) - logprob(transformers + library)| over greedy tokens = {worst:.2e}")
    assert worst < (5e-2 if spec == "int8" else 1e-2)


@pytest.mark.parametrize("spec,overrides", [("gptq:4:32", dict(act_order=True, sym=False)), ("int8", {}), ("nf4", {})],
                         ids=["gptq", "int8", "nf4"])
def test_quantized_linears_on_both_engine_paths(spec, overrides, quantized):
    """With our fp32 C kernels for the rest of the layer, and with torch ops only: the same greedy tokens."""
    from transformers import AutoTokenizer

    path = quantized(spec, **overrides)
    tok = AutoTokenizer.from_pretrained(path)
    fast, fast_outs = _engine_greedy(path, tok, use_cpu_kernels=True)
    plain, plain_outs = _engine_greedy(path, tok, use_cpu_kernels=False)
    if fast.runner.model.kernels is None:
        pytest.skip(f"no CPU kernels here: {fast.runner.model.kernel_path}")
    assert "with quantized linears" in fast.runner.model.kernel_path
    assert plain.runner.model.kernel_path.startswith("torch ops with quantized linears")
    for a, b in zip(fast_outs, plain_outs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        got = torch.tensor([lp.chosen.logprob for lp in a.outputs[0].logprobs])
        ref = torch.tensor([lp.chosen.logprob for lp in b.outputs[0].logprobs])
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_int8_activations_bounded_logprob_error(quantized, monkeypatch, capsys):
    """The default for one-row 4-bit GEMVs (activations rounded to int8 per 32 columns, as onnxruntime-genai's int4
    default; LMFORGE_Q4_ACTIVATIONS=fp32 turns it off): the path is named, and against the exact fp32-activation
    path the greedy tokens agree up to the first divergence with a bounded, reported per-token logprob error."""
    from transformers import AutoTokenizer

    def one_at_a_time(q4_activations=None):  # one sequence per step: decode steps of one row, the path it changes
        engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", device="cpu", q4_activations=q4_activations))
        params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=1)
        return engine, [engine.generate([tok(p, add_special_tokens=False)["input_ids"]], params)[0] for p in PROMPTS]

    path = quantized("gptq:4:32")
    tok = AutoTokenizer.from_pretrained(path)
    monkeypatch.delenv("LMFORGE_Q4_ACTIVATIONS")
    exact, exact_outs = one_at_a_time("fp32")  # EngineConfig / `lmforge serve --q4-activations fp32`
    if exact.runner.model.kernels is None:
        pytest.skip(f"no CPU kernels here: {exact.runner.model.kernel_path}")
    assert "int8-activation" not in exact.runner.model.kernel_path
    rounded, rounded_outs = one_at_a_time()  # the default
    assert "int8-activation" in rounded.runner.model.kernel_path
    monkeypatch.setenv("LMFORGE_Q4_ACTIVATIONS", "int8")  # the config wins over the environment
    assert "int8-activation" not in one_at_a_time("fp32")[0].runner.model.kernel_path
    worst, compared = 0.0, 0
    for a, b in zip(rounded_outs, exact_outs):
        same = [x == y for x, y in zip(a.outputs[0].token_ids, b.outputs[0].token_ids)]
        n = same.index(False) if False in same else len(same)
        got = torch.tensor([lp.chosen.logprob for lp in a.outputs[0].logprobs][:n])
        ref = torch.tensor([lp.chosen.logprob for lp in b.outputs[0].logprobs][:n])
        worst, compared = max(worst, float((got - ref).abs().max()) if n else 0.0), compared + n
    print(f"int8 activations: max |logprob error| {worst:.2e} over {compared} greedy tokens")
    assert compared >= 16 and 0 < worst < 5e-2


def _greedy_with(engine, tok):
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=1)
    outs = engine.generate([tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS], params)
    return [(list(o.outputs[0].token_ids), [lp.chosen.logprob for lp in o.outputs[0].logprobs]) for o in outs]


@pytest.mark.parametrize("spec,overrides,q4_activations", [
    ("gptq:4:32", {}, "fp32"), ("gptq:4:32", {}, "int8"), ("gptq:8:channel", dict(sym=False), "fp32"),
    ("int8", dict(quantize_lm_head=True), "fp32"), ("gptq:4:32", dict(act_order=True, sym=False), "fp32")],
    ids=["int4", "int4-int8act", "int8-asym", "int8+lm_head", "int4-act-order"])
def test_one_call_forward_with_quantized_projections_is_bit_identical_to_per_op(spec, overrides, q4_activations,
                                                                                 quantized, monkeypatch):
    """Steps of few rows run every layer in one C call with the low-bit kernels as projection descriptors; the
    per-op path (a Python call per kernel) is the reference: the same tokens and the very same logprobs. Act-order
    checkpoints (x permuted per linear) keep the per-op path."""
    from transformers import AutoTokenizer

    monkeypatch.setenv("LMFORGE_Q4_ACTIVATIONS", q4_activations)
    path = quantized(spec, **overrides)
    tok = AutoTokenizer.from_pretrained(path)
    fused = LLMEngine(EngineConfig(model=str(path), dtype="float32", device="cpu", max_num_batched_tokens=24))
    model = fused.runner.model
    if model.kernels is None:
        pytest.skip(f"no CPU kernels here: {model.kernel_path}")
    one_call = not overrides.get("act_order")
    assert (model._proj_descs is not None) == one_call
    assert ("in one call with the quantized projections" in model.kernel_path) == one_call
    per_op = LLMEngine(EngineConfig(model=str(path), dtype="float32", device="cpu", max_num_batched_tokens=24))
    per_op.runner.model._proj_descs = per_op.runner.model._layer_ptrs = None  # every step through Python
    assert _greedy_with(fused, tok) == _greedy_with(per_op, tok)
