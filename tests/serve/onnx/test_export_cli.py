"""The CLI: an int8 export end to end, and every bad input as a one-line error (exit 2) with nothing written."""

from __future__ import annotations

import json
import shutil

import pytest

from lifecycle.cli import main


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["export", "--format", "onnx", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_int8_export_prints_parity_and_perplexity_change(trained_checkpoint, tmp_path, capsys):
    out = tmp_path / "int8"
    code, stdout, _ = run(capsys, trained_checkpoint, "-o", out, "--quantize", "int8", "--parity-prompts", "2",
                          "--parity-tokens", "8")
    assert code == 0
    assert "greedy tokens identical on 2 prompts x 8 tokens" in stdout
    assert "perplexity (" in stdout and "->" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["bits"] == 8
    ppl = manifest["metrics"]["perplexity"]
    assert abs(ppl["relative_change"]) < 0.25


def _plain_copy(checkpoint, tmp_path, name, **config_changes):
    copy = tmp_path / name
    shutil.copytree(checkpoint, copy)
    (copy / "manifest.json").unlink()  # a plain transformers directory: its config may be edited
    config = json.loads((copy / "config.json").read_text()) | config_changes
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("case", ["missing", "not_a_checkpoint", "unsupported_arch", "quantized", "output_exists",
                                  "fp16_with_int4", "onnx_as_source", "base_flag", "eval_data_missing"])
def test_bad_input_is_one_line_error_and_writes_nothing(case, trained_checkpoint, onnx_fp32, tmp_path, capsys):
    out = tmp_path / "out"
    args, expect = {
        "missing": ([tmp_path / "nope", "-o", out], "no such checkpoint directory"),
        "not_a_checkpoint": ([tmp_path, "-o", out], "config.json is missing"),
        "unsupported_arch": ([_plain_copy(trained_checkpoint, tmp_path, "gpt2", model_type="gpt2"), "-o", out],
                             "model_type 'gpt2' is not supported"),
        "quantized": ([_plain_copy(trained_checkpoint, tmp_path, "q", quantization_config={"quant_method": "gptq"}),
                       "-o", out], "the checkpoint is quantized (gptq)"),
        "output_exists": ([trained_checkpoint, "-o", onnx_fp32], "already exists; pass --overwrite"),
        "fp16_with_int4": ([trained_checkpoint, "-o", out, "--dtype", "fp16", "--quantize", "int4"],
                           "--quantize int4 with --dtype fp16"),
        "onnx_as_source": ([onnx_fp32, "-o", out], "is an ONNX export already; export its parent checkpoint"),
        "base_flag": ([trained_checkpoint, "-o", out, "--base", trained_checkpoint], "--base: only for merging"),
        "eval_data_missing": ([trained_checkpoint, "-o", out, "--quantize", "int4", "--eval-data", tmp_path / "x.txt"],
                              "--eval-data"),
    }[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run(capsys, *args)
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expect in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary directory left
