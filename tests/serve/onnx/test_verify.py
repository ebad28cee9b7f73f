"""`lmforge checkpoint verify` on ONNX exports: hashes of every file (the external-data weights included) and what
the export is; a tampered or unlisted file is a one-line error naming it."""

from __future__ import annotations

import json
import shutil

from lifecycle.cli import main


def verify(capsys, path) -> tuple[int, str, str]:
    code = main(["checkpoint", "verify", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def test_fp32_export_verifies_and_says_what_it_is(onnx_fp32, trained_checkpoint, capsys):
    code, out, _ = verify(capsys, onnx_fp32)
    files = json.loads((onnx_fp32 / "manifest.json").read_text())["files"]
    assert code == 0
    assert f"{onnx_fp32}: OK ({len(files)} files verified, external data: model.onnx.data)" in out
    assert "format onnx, opset 18, dtype float32, quantization none" in out
    assert f"parent {trained_checkpoint.resolve()}" in out


def test_int4_export_names_its_quantization(onnx_int4, capsys):
    code, out, _ = verify(capsys, onnx_int4)
    assert code == 0 and "quantization onnxruntime-matmul-nbits 4-bit, groups of 32" in out


def test_tampered_external_data_fails_naming_the_file(onnx_fp32, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(onnx_fp32, copy)
    data = copy / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one weight byte changed
    data.write_bytes(bytes(raw))
    code, out, err = verify(capsys, copy)
    assert code != 0 and "OK" not in out
    assert f"{data}: sha256 does not match manifest.json" in err and len(err.strip().splitlines()) == 1


def test_external_data_missing_from_the_manifest_fails_naming_it(onnx_fp32, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(onnx_fp32, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["files"]["model.onnx.data"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = verify(capsys, copy)
    assert code != 0 and f"{copy / 'model.onnx.data'}: model.onnx keeps tensor data in it" in err


def test_info_describes_an_onnx_export(onnx_fp32, capsys):
    assert main(["checkpoint", "info", str(onnx_fp32)]) == 0
    assert "format onnx, opset 18, dtype float32" in capsys.readouterr().out
    assert main(["checkpoint", "info", str(onnx_fp32), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "onnx"
