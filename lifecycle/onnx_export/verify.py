"""`lmforge checkpoint verify` of an ONNX export: every file against the manifest's sha256 (the external-data file
holding the weights included), every external-data file the graph references listed in the manifest, and a
one-line account of what the export is (format, opset, quantization, parent)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lifecycle.errors import CheckpointError


def is_onnx_export(path: Path) -> bool:
    """Whether `path` holds a manifest of kind "onnx" (whatever else is wrong with it)."""
    import json

    from lifecycle.checkpoint import MANIFEST_NAME
    from lifecycle.onnx_export.export import KIND

    try:
        manifest = json.loads((Path(path) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("kind") == KIND


def external_data_files(onnx_path: Path) -> set[str]:
    """The files (relative to the graph's directory) that model.onnx's tensors keep their data in."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - a damaged protobuf: name the file
        raise CheckpointError(f"{onnx_path}: not a readable ONNX model ({type(err).__name__}: {err})") from None
    return {entry.value for tensor in _get_all_tensors(proto) if uses_external_data(tensor)
            for entry in tensor.external_data if entry.key == "location"}


def verify_onnx_export(path: str | Path) -> dict[str, Any]:
    """Verify the export at `path` (raises CheckpointError naming the file) -> what it is, for the report."""
    from lifecycle.checkpoint import MANIFEST_NAME
    from lifecycle.onnx_export.export import load_onnx_export
    from lifecycle.onnx_export.graph import WEIGHTS_NAME

    path, manifest, _ = load_onnx_export(path)  # every listed file: present, size, sha256
    listed = set(manifest["files"])
    external = external_data_files(path / WEIGHTS_NAME)
    for name in sorted(external):
        if name not in listed:
            raise CheckpointError(f"{path / name}: {WEIGHTS_NAME} keeps tensor data in it but {MANIFEST_NAME} does not "
                                  "list it, so its contents are not verified; re-create the export")
    onnx_info = manifest.get("onnx") or {}
    return {"path": str(path), "num_files": len(listed), "external_data": sorted(external),
            "opset": onnx_info.get("opset"), "dtype": (manifest.get("model") or {}).get("dtype"),
            "quantization": manifest.get("quantization"), "parent": (manifest.get("parent") or {}).get("path")}


def describe(summary: dict[str, Any]) -> str:
    """`verify_onnx_export`'s result as the lines `lmforge checkpoint verify` prints."""
    q = summary["quantization"]
    quant = "none" if not q else (f"{q.get('method')} {q.get('bits')}-bit"
                                  + (f", groups of {q['group_size']}" if q.get("group_size") else ""))
    external = ", ".join(summary["external_data"]) or "none"
    return (f"{summary['path']}: OK ({summary['num_files']} files verified, external data: {external})\n"
            f"  format onnx, opset {summary['opset']}, dtype {summary['dtype']}, quantization {quant}\n"
            f"  parent {summary['parent'] or '-'}")
