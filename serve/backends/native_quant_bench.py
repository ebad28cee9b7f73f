"""`lmforge bench engine --backend native-int4,native-int8`: the native engine on our own quantized children of the
bench model, in the same invocation as the onnxruntime exports of that model (serve/backends/onnxruntime_bench.py).

    native-int4  `lmforge quantize --method rtn:4:32`: round-to-nearest, 4-bit, symmetric, groups of 32 along the
                 input dimension, which is the block size and symmetry of the onnxruntime-int4 export (MatMulNBits,
                 lifecycle/onnx_export/quantize.py INT4_BLOCK_SIZE, is_symmetric=True). The grids differ in one
                 detail: ours spans [-absmax, absmax] in 15 steps around the zero 8, onnxruntime's maps -absmax
                 to code 0 (scale absmax / 8). The cost per weight is the same.
    native-int8  `lmforge quantize --method int8`: int8 weights, one scale per output channel (symmetric).

The LM head: MatMulNBits (and onnxruntime's dynamic int8) quantize every MatMul with a constant weight, the LM head
included, so both children quantize it too (`--quantize-lm-head`). A tied LM head (tie_word_embeddings) cannot be:
our quantizer never quantizes embeddings, so it stays fp32 and the row says so (`lm_head` in the result).

Quantized once per (weights, method) into $LMFORGE_HOME/bench/quant/ with `lmforge quantize`'s own functions
(hashes verified, manifest naming the parent); the engine then runs in-process with the native engine's
measuring functions (serve/bench_engine.py) on the same prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# name -> `lmforge quantize` method spec
BACKENDS = {"native-int4": "rtn:4:32", "native-int8": "int8"}


def _plan(model_path: Path, spec: str):
    """(source checkpoint, QuantConfig) for `spec`; raises naming config.json when the model's shapes do not fit."""
    from quant.config import parse_spec
    from quant.quantize import check_shapes, open_source

    src = open_source(model_path)  # verifies hashes; refuses an already-quantized checkpoint
    cfg = parse_spec(spec, quantize_lm_head=not src.config.get("tie_word_embeddings"))
    check_shapes(src, cfg)  # e.g. group size 32 must divide hidden and intermediate sizes
    return src, cfg


def check_backend(name: str, model_path: Path) -> None:
    """Fail before any measurement when `name` cannot quantize this model."""
    _plan(model_path, BACKENDS[name])


def quantize_for_bench(model_path: Path, cache_dir: Path, spec: str, *, progress: bool = True) -> Path:
    """The quantized child of `model_path` for `spec`, made once and cached by the parent's weights hash."""
    from quant.quantize import quantize_checkpoint

    src, cfg = _plan(model_path, spec)
    files = (src.manifest or {}).get("files", {})
    digest = (files.get("model.safetensors") or {}).get("sha256") or model_path.resolve().as_posix().replace("/", "_")
    tied = not cfg.quantize_lm_head
    out = cache_dir / "bench" / "quant" / f"{digest[:16]}-{cfg.label.replace(':', '-')}{'' if tied else '-head'}"
    if (out / "manifest.json").is_file():
        return out
    quantize_checkpoint(src, out, cfg, calib=None, calib_source="", progress=progress, overwrite=True)
    return out


def run_backend(name: str, model_path: Path, cache_dir: Path, w1: tuple | None, w2: tuple | None,
                ) -> dict[str, dict[str, Any]]:
    """workload -> result (token_ids included, for greedy agreement with the fp32 native run)."""
    from lifecycle.checkpoint import load_checkpoint
    from serve.bench_engine import native_stream, native_w1
    from serve.engine.llm_engine import EngineConfig, LLMEngine

    path = quantize_for_bench(model_path, cache_dir, BACKENDS[name])
    quant = load_checkpoint(path).quantization or {}
    engine = LLMEngine(EngineConfig(model=str(path)))
    about = {"checkpoint": str(path), "method": BACKENDS[name], "group_size": quant.get("group_size"),
             "lm_head": "quantized" if quant.get("quantize_lm_head") else "fp32 (tied to the embeddings)",
             "kernel_path": engine.runner.model.kernel_path}
    prompt = (w1 or w2)[0][0]
    engine.generate([prompt[:8]], None)  # warm-up: allocator, thread pool, kernel build
    results = {}
    if w1:
        print(f"[bench] {name} W1: {len(w1[0])} requests", flush=True)
        results["w1"] = native_w1(engine, *w1) | about
    if w2:
        print(f"[bench] {name} W2: one stream", flush=True)
        results["w2"] = native_stream(engine, w2[0][0], w2[1], "w2") | about
    return results
