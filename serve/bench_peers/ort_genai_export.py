"""Export a checkpoint for onnxruntime-genai with its model builder, once per (weights, precision).

The builder runs offline from the local checkpoint dir, under the peers' python:
    python -m onnxruntime_genai.models.builder -i CKPT -o OUT -p fp32 -e cpu -c CACHE

Hazard (onnxruntime-genai 0.18, `models/builders/base.py` `make_model` / `has_lm_head`): the builder walks every
module and treats *any* `nn.Linear` whose `out_features == vocab_size` as the LM head, so a checkpoint with, say,
`intermediate_size == vocab_size` exports with the logits wired to an MLP projection (shared/NOTES.md). Such a
checkpoint is refused before exporting, naming the layers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from lifecycle.errors import ConfigError

PRECISIONS = ("fp32", "int4")


def lm_head_hazards(config: dict[str, Any]) -> list[str]:
    """Names of the linear layers (besides `lm_head`) whose out_features equal the vocabulary size.

    The model is built on the meta device (no memory, no weights) so the module tree is exactly the one the
    builder walks, whatever the architecture; layers repeated per block are reported once (`layers.*.`).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    vocab = hf_config.vocab_size
    names = {_generic(name) for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and module.out_features == vocab and name != "lm_head"}
    return sorted(names)


def _generic(name: str) -> str:
    """model.layers.3.mlp.up_proj -> model.layers.*.mlp.up_proj"""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def check_exportable(checkpoint: Path) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    hazards = lm_head_hazards(config)
    if hazards:
        raise ConfigError(
            f"{checkpoint / 'config.json'}: vocab_size {config['vocab_size']} equals the output size of "
            f"{', '.join(hazards)}; onnxruntime-genai's model builder takes any linear layer of that size for the "
            f"LM head and would export wrong logits. Refusing to export: benchmark onnxruntime-genai on a "
            f"checkpoint whose vocab_size differs from its hidden, attention and intermediate sizes.")


def export_key(checkpoint: Path, precision: str) -> str:
    """The weights' hash from the checkpoint manifest (or the file's size and mtime without one) + precision."""
    manifest = checkpoint / "manifest.json"
    if manifest.is_file():
        files = json.loads(manifest.read_text()).get("files", {})
        digest = files.get("model.safetensors", {}).get("sha256") if isinstance(files, dict) else None
        if digest:
            return f"{digest[:16]}-{precision}"
    stat = (checkpoint / "model.safetensors").stat()
    return f"{stat.st_size:x}-{int(stat.st_mtime):x}-{precision}"


def export(checkpoint: Path, cache_dir: Path, python: Path, precision: str = "fp32",
           timeout_s: float = 1800) -> Path:
    """The exported model dir under `cache_dir`, built by the peers' python unless already there."""
    if precision not in PRECISIONS:
        raise ConfigError(f"onnxruntime-genai precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    check_exportable(checkpoint)
    out = cache_dir / export_key(checkpoint, precision)
    if (out / ".exported").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(cache_dir / "builder-cache")]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"onnxruntime-genai export of {checkpoint} failed ({' '.join(cmd)}):\n{tail}")
    (out / ".exported").write_text(json.dumps({"checkpoint": str(checkpoint), "precision": precision}))
    return out
