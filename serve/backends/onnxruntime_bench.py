"""`lmforge bench engine --backend onnxruntime,onnxruntime-int4`: W1 / W2 on the onnxruntime backend's engine.
`onnxruntime*` use the batched runner (plain onnxruntime, one call per step), `onnxruntime-genai*` one
onnxruntime-genai Generator per sequence (serve/backends/onnxruntime_runners.py).

The checkpoint is exported once per (weights, precision) into $LMFORGE_HOME/bench/onnx/ with the same export
(and parity check) as `lmforge export --format onnx`; the engine then runs in-process, with the same prompts and
greedy / ignore-EOS settings, and the same measuring functions as the native engine (serve/bench_engine.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# name -> (--quantize, OrtEngine runner)
BACKENDS = {"onnxruntime": (None, "batched"), "onnxruntime-int4": ("int4", "batched"),
            "onnxruntime-genai": (None, "genai"), "onnxruntime-genai-int4": ("int4", "genai")}


def export_for_bench(model_path: Path, cache_dir: Path, quantize: str | None) -> Path:
    from lifecycle.onnx_export.export import OnnxExportConfig, export_onnx

    files = json.loads((model_path / "manifest.json").read_text()).get("files", {}) \
        if (model_path / "manifest.json").is_file() else {}
    digest = (files.get("model.safetensors") or {}).get("sha256") or model_path.resolve().as_posix().replace("/", "_")
    out = cache_dir / "bench" / "onnx" / f"{digest[:16]}-{quantize or 'fp32'}"
    if (out / "manifest.json").is_file():
        return out
    heldout = sorted(model_path.parent.glob("**/heldout.jsonl"))[:1]  # the bench's default model keeps its corpus
    export_onnx(OnnxExportConfig(checkpoint=str(model_path), output=str(out), quantize=quantize,
                                 eval_data=[str(p) for p in heldout], overwrite=True))
    return out


def run_backend(name: str, model_path: Path, cache_dir: Path, w1: tuple | None, w2: tuple | None,
                ) -> dict[str, dict[str, Any]]:
    """workload -> result (token_ids included, for greedy agreement with the native engine)."""
    from serve.backends.onnxruntime_engine import OrtEngine
    from serve.bench_engine import native_stream, native_w1

    quantize, runner = BACKENDS[name]
    export = export_for_bench(model_path, cache_dir, quantize)
    results = {}
    if w1:
        engine = OrtEngine(export, max_num_seqs=len(w1[0]), runner=runner)
        engine.generate([w1[0][0][:8]], None)  # warm-up
        print(f"[bench] {name} W1: {len(w1[0])} requests", flush=True)
        results["w1"] = native_w1(engine, *w1)
    if w2:
        engine = OrtEngine(export, max_num_seqs=1, runner=runner)
        engine.generate([w2[0][0][:8]], None)
        print(f"[bench] {name} W2: one stream", flush=True)
        results["w2"] = native_stream(engine, w2[0][0], w2[1], "w2")
    return results
