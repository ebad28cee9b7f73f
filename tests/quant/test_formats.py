"""Our checkpoints in the standard formats: transformers loads them with the reference libraries
(GPTQModel + optimum for GPTQ, bitsandbytes for int8/NF4) and computes what our reader dequantizes."""

from __future__ import annotations

import json

import pytest
import torch

from lifecycle.checkpoint import load_checkpoint
from quant.report import load_dequantized

CASES = [("gptq:4:32", dict(act_order=True, sym=False)),  # permuted g_idx, asymmetric v1 zeros
         ("rtn:3:64", dict(sym=False)),  # 3-bit words that straddle int32 boundaries
         ("gptq:8:channel", {}),
         ("int8", {}), ("nf4", {}),
         # A quantized LM head: bitsandbytes loads it; transformers 5.19's GPTQ loader (optimum) does not (it replaces
         # only the decoder blocks' linears and re-initializes lm_head), so no gptq case here.
         ("nf4", dict(quantize_lm_head=True))]


def _library_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu").eval()


@pytest.mark.parametrize("spec,overrides", CASES,
                         ids=[c[0] + ("+lm_head" if c[1].get("quantize_lm_head") else "") for c in CASES])
def test_transformers_loads_it_and_agrees_with_our_reader(spec, overrides, quantized, tiny_checkpoint):
    if spec.startswith(("gptq", "rtn")):
        pytest.importorskip("gptqmodel")
        pytest.importorskip("optimum")
    else:
        pytest.importorskip("bitsandbytes")
    path = quantized(spec, **overrides)
    ckpt = load_checkpoint(path)  # hashes verify
    assert ckpt.manifest["recipe"] == "quantize"
    assert ckpt.manifest["quantization"]["method"] == spec.split(":")[0]
    assert ckpt.manifest["parent"]["path"] == str(tiny_checkpoint.resolve())
    assert ckpt.manifest["quantization"]["quantize_lm_head"] is bool(overrides.get("quantize_lm_head"))
    assert json.loads((path / "generation_config.json").read_text())["do_sample"] is False
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lib = _library_model(path)(ids).logits
        ours = load_dequantized(tiny_checkpoint, path)(ids).logits
    # GPTQModel's CPU kernels and LLM.int8 compute in reduced precision (LLM.int8 casts inputs to fp16).
    tol = 3e-2 if spec == "int8" else 1e-2
    assert float((lib - ours).abs().max()) < tol
    assert torch.equal(lib.argmax(-1), ours.argmax(-1))


def test_gptq_tensor_layout(quantized):
    from safetensors.torch import load_file

    path = quantized("gptq:4:32", act_order=True, sym=False)
    state = load_file(str(path / "model.safetensors"))
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 32 and qc["desc_act"] is True
    assert qc["checkpoint_format"] == "gptq" and qc["sym"] is False
    p = "model.layers.0.mlp.down_proj."  # in 128, out 64
    assert state[p + "qweight"].shape == (16, 64) and state[p + "qweight"].dtype == torch.int32
    assert state[p + "qzeros"].shape == (4, 8) and state[p + "scales"].shape == (4, 64)
    assert state[p + "scales"].dtype == torch.float16 and state[p + "g_idx"].shape == (128,)
    assert p + "weight" not in state and "model.embed_tokens.weight" in state  # embeddings stay unquantized


def test_lm_head_stays_fp16_unless_asked(quantized):
    from safetensors.torch import load_file

    plain = load_file(str(quantized("gptq:4:32", act_order=True, sym=False) / "model.safetensors"))
    assert plain["lm_head.weight"].dtype == torch.float16 and "lm_head.qweight" not in plain
    path = quantized("gptq:4:32", quantize_lm_head=True)
    state = load_file(str(path / "model.safetensors"))
    assert "lm_head.weight" not in state and state["lm_head.qweight"].shape == (8, 512)  # in 64 -> 8 words, out 512
    assert json.loads((path / "config.json").read_text())["quantization_config"]["lm_head"] is True
    assert state["model.embed_tokens.weight"].dtype == torch.float16  # embeddings: never


def test_quantize_lm_head_refused_where_it_cannot_work():
    from types import SimpleNamespace

    from lifecycle.errors import ConfigError
    from quant.config import parse_spec
    from quant.quantize import check_shapes

    tied = SimpleNamespace(path=__import__("pathlib").Path("/m"), config=dict(
        hidden_size=64, intermediate_size=128, vocab_size=512, tie_word_embeddings=True))
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        check_shapes(tied, parse_spec("rtn:4:32", quantize_lm_head=True))
    check_shapes(tied, parse_spec("rtn:4:32"))  # without the flag a tied model is fine
    with pytest.raises(ConfigError, match="only with lmforge's solver"):
        parse_spec("gptq:4:32@gptqmodel", quantize_lm_head=True)
