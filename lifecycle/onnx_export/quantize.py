"""Graph-level precision changes of an exported decoder, each from the fp32 graph to a new model.onnx:

    fp16   every float tensor (weights, activations, KV cache) in float16: onnxruntime.transformers.float16
    int8   onnxruntime dynamic quantization: MatMul weights int8 per tensor, activations quantized per call
           (MatMulInteger); the attention matmuls (no constant weight) stay fp32
    int4   MatMulNBits: weights in 4-bit blocks along the input dimension with one fp32 scale each,
           symmetric (onnxruntime.quantization.matmul_nbits_quantizer, the kernels onnxruntime-genai runs)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lifecycle.onnx_export.graph import EXTERNAL_DATA_NAME, WEIGHTS_NAME

QUANTIZATIONS = ("int8", "int4")
DTYPES = ("fp32", "fp16")
INT4_BLOCK_SIZE = 32


def _save(model: Any, out_dir: Path) -> Path:
    import onnx

    path = out_dir / WEIGHTS_NAME
    for stale in (path, out_dir / EXTERNAL_DATA_NAME):
        stale.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA_NAME, size_threshold=1024)
    return path


def to_fp16(src: Path, out_dir: Path) -> Path:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return _save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=False), out_dir)


def to_int8(src: Path, out_dir: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = out_dir / "int8.tmp.onnx"
    quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, use_external_data_format=True)
    import onnx

    model = onnx.load(str(tmp))
    for stale in out_dir.glob("int8.tmp.onnx*"):
        stale.unlink()
    return _save(model, out_dir)


def to_int4(src: Path, out_dir: Path, *, block_size: int = INT4_BLOCK_SIZE) -> Path:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=block_size, is_symmetric=True)
    quantizer.process()
    return _save(quantizer.model.model, out_dir)


def quantization_config(quantize: str | None, dtype: str) -> dict[str, Any] | None:
    """What the manifest records (None: weights in the export dtype)."""
    if quantize == "int8":
        return {"method": "onnxruntime-dynamic", "bits": 8, "weights": "MatMul, int8 per tensor",
                "activations": "uint8 per call (DynamicQuantizeLinear)", "compute_dtype": dtype}
    if quantize == "int4":
        return {"method": "onnxruntime-matmul-nbits", "bits": 4, "group_size": INT4_BLOCK_SIZE, "symmetric": True,
                "weights": "MatMul", "compute_dtype": dtype}
    return None


def apply(src: Path, out_dir: Path, *, dtype: str, quantize: str | None) -> Path:
    """fp32 graph `src` -> out_dir/model.onnx in the requested precision (src may be out_dir/model.onnx)."""
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))  # the quantizers log per node
    path = src
    if quantize == "int8":
        path = to_int8(path, out_dir)
    elif quantize == "int4":
        path = to_int4(path, out_dir)
    if dtype == "fp16":
        path = to_fp16(path, out_dir)
    return path
