"""ONNX exports of the trained tiny checkpoint (tests/serve/conftest.py), made once per session, and a factory that
builds the onnxruntime backend from an export: `build_backend` (serve/backends/onnxruntime.py), the function a
shared backend test-suite plugs in."""

from __future__ import annotations

from pathlib import Path

import pytest


def make_export(checkpoint: Path, out: Path, **overrides) -> Path:
    from lifecycle.onnx_export.export import OnnxExportConfig, export_onnx

    cfg = OnnxExportConfig(checkpoint=str(checkpoint), output=str(out), progress=False,
                           **{"parity_prompts": 2, "parity_tokens": 16, "eval_blocks": 4} | overrides)
    path, _ = export_onnx(cfg)
    return path


@pytest.fixture(scope="session")
def onnx_fp32(trained_checkpoint, tmp_path_factory) -> Path:
    return make_export(trained_checkpoint, tmp_path_factory.mktemp("onnx") / "fp32")


@pytest.fixture(scope="session")
def onnx_int4(trained_checkpoint, tmp_path_factory) -> Path:
    return make_export(trained_checkpoint, tmp_path_factory.mktemp("onnx") / "int4", quantize="int4")
