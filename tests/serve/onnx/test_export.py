"""`lmforge export --format onnx`: parity with transformers, the manifest, quantized exports' perplexity report,
and a failed parity check publishing nothing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from lifecycle.errors import CheckpointError
from lifecycle.onnx_export import export as export_module
from lifecycle.onnx_export.export import OnnxExportConfig, ParityError, export_onnx, load_onnx_export
from lifecycle.onnx_export.runner import OnnxDecoder, torch_greedy


def test_fp32_export_reproduces_transformers_greedy_through_the_kv_cache(onnx_fp32, trained_checkpoint):
    from lifecycle.checkpoint import load_checkpoint

    path, manifest, config = load_onnx_export(onnx_fp32)
    parity = manifest["metrics"]["parity_fp32"]
    assert parity["identical_fraction"] == 1.0 and parity["max_abs_logit_diff"] < 1e-4
    assert manifest["metrics"]["genai_greedy_identical"] is True
    # Independently of the export's own check: other prompts, longer, with a batch-1 cache from empty.
    model = load_checkpoint(trained_checkpoint).load_model().eval()
    decoder = OnnxDecoder(path / "model.onnx", config)
    for prompt in ([1, 2, 3], list(range(40, 100))):
        ours, our_logits = decoder.greedy(prompt, 24)
        theirs, their_logits = torch_greedy(model, prompt, 24)
        assert ours == theirs
        assert np.abs(our_logits - their_logits).max() < 1e-4


def test_manifest_names_parent_hashes_opset_and_quantization(onnx_fp32, onnx_int4, trained_checkpoint):
    from lifecycle.checkpoint import load_checkpoint

    parent = load_checkpoint(trained_checkpoint)
    _, manifest, _ = load_onnx_export(onnx_fp32)
    assert manifest["kind"] == "onnx" and manifest["recipe"] == "export-onnx"
    assert manifest["parent"] == parent.reference()
    assert manifest["onnx"]["opset"] == 18
    assert manifest["onnx"]["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert manifest["quantization"] is None and manifest["model"]["dtype"] == "float32"
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "config.json", "tokenizer.json"} <= set(manifest["files"])
    genai = json.loads((onnx_fp32 / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["num_hidden_layers"] == 2
    _, q_manifest, _ = load_onnx_export(onnx_int4)
    assert q_manifest["quantization"]["bits"] == 4 and q_manifest["quantization"]["method"] == "onnxruntime-matmul-nbits"


def test_tampered_export_is_refused_naming_the_file(onnx_fp32, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(onnx_fp32, copy)
    (copy / "genai_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="genai_config.json: size"):
        load_onnx_export(copy)


def test_int4_export_runs_matmulnbits_and_reports_perplexity(onnx_int4):
    import onnx

    _, manifest, _ = load_onnx_export(onnx_int4)
    ops = {node.op_type for node in onnx.load(str(onnx_int4 / "model.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops
    ppl = manifest["metrics"]["perplexity"]
    assert 1 < ppl["before"] < 512 and 1 < ppl["after"] < 512  # a 512-token vocabulary bounds a sane model
    assert ppl["relative_change"] == pytest.approx(ppl["after"] / ppl["before"] - 1)
    assert abs(ppl["relative_change"]) < 0.25  # 4-bit blocks of 32 cost this tiny model little
    assert (onnx_int4 / "model.onnx.data").stat().st_size < 0.5 * manifest["model"]["num_parameters"] * 4


def test_failed_parity_fails_the_export_and_publishes_nothing(onnx_fp32, trained_checkpoint, tmp_path, monkeypatch):
    def copy_traced(model, out_dir, *, opset):  # the real traced graph, without tracing again
        for name in ("model.onnx", "model.onnx.data"):
            shutil.copy2(onnx_fp32 / name, out_dir / name)
        return out_dir / "model.onnx"

    def wrong_greedy(model, prompt, num_tokens):  # transformers "disagrees" from the third token on
        tokens, logits = torch_greedy(model, prompt, num_tokens)
        return tokens[:2] + [(t + 1) % 512 for t in tokens[2:]], logits

    monkeypatch.setattr(export_module.graph, "export_decoder", copy_traced)
    monkeypatch.setattr(export_module, "torch_greedy", wrong_greedy)
    out = tmp_path / "out"
    with pytest.raises(ParityError, match="from token 2"):
        export_onnx(OnnxExportConfig(checkpoint=str(trained_checkpoint), output=str(out), progress=False,
                                     parity_prompts=1, parity_tokens=8))
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary directory is left


def test_intermediate_size_equal_to_vocab_size_exports_the_right_lm_head(trained_checkpoint, tmp_path):
    """onnxruntime-genai's model builder would wire the logits to an MLP projection here (it takes any linear
    layer of vocabulary size for the LM head); this exporter traces the model itself, so parity holds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lifecycle.checkpoint import load_checkpoint, save_checkpoint

    parent = load_checkpoint(trained_checkpoint)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=512, vocab_size=512, max_position_embeddings=128)
    ckpt = save_checkpoint(tmp_path / "hazard", LlamaForCausalLM(config), parent.load_tokenizer(),
                           recipe="random-init", recipe_config={})
    out, metrics = export_onnx(OnnxExportConfig(checkpoint=str(ckpt.path), output=str(tmp_path / "onnx"),
                                                progress=False, parity_prompts=2, parity_tokens=8))
    assert metrics["parity_fp32"]["identical_fraction"] == 1.0
    assert metrics["parity_fp32"]["max_abs_logit_diff"] < 1e-4
