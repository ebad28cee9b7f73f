"""quantize_checkpoint: checkpoint in, quantized checkpoint out (one method), nothing written on any error."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lifecycle.checkpoint import Checkpoint, load_checkpoint
from lifecycle.errors import CheckpointError, ConfigError
from quant import calibration
from quant.config import QuantConfig
from quant.primitives import check_group_size


@dataclass
class QuantizeOutcome:
    checkpoint: Checkpoint
    calibration_s: float  # time spent solving (GPTQ: capture + Hessians + solver; others: rounding)
    num_calibration_samples: int
    calibration_source: str


def open_source(path: str | Path) -> Checkpoint:
    """The checkpoint to quantize: verified hashes, not already quantized."""
    ckpt = load_checkpoint(path)  # refuses a hash mismatch naming the file
    if ckpt.quantization:
        method = ckpt.quantization.get("method") or ckpt.quantization.get("quant_method")
        parent = ((ckpt.manifest or {}).get("parent") or {}).get("path")
        raise CheckpointError(f"{ckpt.path}: already quantized ({method}); quantize its unquantized parent"
                              + (f" {parent}" if parent else "") + " instead")
    return ckpt


def check_shapes(ckpt: Checkpoint, cfg: QuantConfig) -> None:
    """Group size must divide every quantized linear's input dimension (hidden and intermediate)."""
    c = ckpt.config
    dims = (c["hidden_size"], c["intermediate_size"])
    for dim, field in zip(dims, ("hidden_size", "intermediate_size")):
        if cfg.method in ("gptq", "rtn") and cfg.group_size is not None and dim % cfg.group_size:
            fits = [g for g in (32, 64, 128, 256) if all(d % g == 0 for d in dims)]
            raise ConfigError(f"group size {cfg.group_size} does not divide the input dimension {dim} of "
                              f"{ckpt.path / 'config.json'} {field}; for this model use "
                              + (", ".join(f"{cfg.method}:{cfg.bits}:{g}" for g in fits) + " or " if fits else "")
                              + f"{cfg.method}:{cfg.bits}:channel")
        if cfg.method in ("gptq", "rtn") and dim % 32:
            raise ConfigError(f"{ckpt.path / 'config.json'}: {field} {dim} is not a multiple of 32, which the GPTQ "
                              "format's int32 packing needs")
    if cfg.quantize_lm_head:
        if c.get("tie_word_embeddings"):
            raise ConfigError(f"--quantize-lm-head: {ckpt.path / 'config.json'} ties the LM head to the embeddings "
                              "(tie_word_embeddings), which stay unquantized; drop the flag for this model")
        if c["vocab_size"] % 32:
            raise ConfigError(f"--quantize-lm-head: vocab_size {c['vocab_size']} in {ckpt.path / 'config.json'} is "
                              "not a multiple of 32, which the packed formats need for the LM head's rows")
    if cfg.method == "nf4":
        for dim, field in ((c["hidden_size"], "hidden_size"), (c["intermediate_size"], "intermediate_size")):
            if dim % cfg.nf4_blocksize and (dim * c["hidden_size"]) % cfg.nf4_blocksize:
                raise ConfigError(f"{ckpt.path / 'config.json'}: {field} {dim} is not a multiple of the NF4 blocksize "
                                  f"{cfg.nf4_blocksize}")


def calibration_ids(ckpt: Checkpoint, cfg: QuantConfig, files: list[str] | None, text_field: str = "text"):
    max_len = ckpt.config.get("max_position_embeddings")
    if max_len is not None and cfg.seq_len > max_len:
        raise ConfigError(f"--seq-len {cfg.seq_len} is longer than the model's context "
                          f"(max_position_embeddings {max_len} in {ckpt.path / 'config.json'})")
    tokenizer = ckpt.load_tokenizer()
    if files:
        texts, source = calibration.file_texts(files, text_field), ", ".join(map(str, files))
    else:
        texts, source = calibration.training_texts(ckpt), f"{ckpt.path} training data (manifest)"
    ids = calibration.calibration_batch(tokenizer, texts, num_samples=cfg.num_samples, seq_len=cfg.seq_len,
                                        seed=cfg.seed, source=source)
    return ids, source


def quantize_checkpoint(src: Checkpoint, out_dir: str | Path, cfg: QuantConfig, *, calib: torch.Tensor | None,
                        calib_source: str = "", progress: bool = True, overwrite: bool = False,
                        metrics: dict[str, Any] | None = None) -> QuantizeOutcome:
    """Quantize `src` with `cfg` into `out_dir` (atomic). `calib` (n, seq_len) ids are needed for gptq only."""
    from quant.formats import write_quantized
    from quant.sequential import quantize_model

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir}: already exists; pass --overwrite to replace it")
    check_shapes(src, cfg)
    torch.manual_seed(cfg.seed)
    model = src.load_model(dtype=torch.float32).eval()
    t0 = time.perf_counter()
    results = None
    if cfg.method in ("gptq", "rtn"):
        results = quantize_model(model, cfg, calib if cfg.method == "gptq" else None, progress=progress)
    elapsed = time.perf_counter() - t0
    recipe_config = {"quant": cfg.to_dict(), "calibration": calib_source if cfg.method == "gptq" else None,
                     "num_calibration_samples": int(calib.shape[0]) if calib is not None and cfg.method == "gptq" else 0}
    ckpt = write_quantized(out_dir, src, model, cfg, results=results, metrics=metrics, recipe_config=recipe_config,
                           overwrite=overwrite)
    return QuantizeOutcome(ckpt, elapsed, recipe_config["num_calibration_samples"], calib_source)
