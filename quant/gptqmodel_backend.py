"""GPTQ by GPTQModel (the maintained successor of AutoGPTQ, which quantizes on CPU here), on the same
calibration sequences as our solver, re-saved as an lmforge checkpoint.

GPTQModel's own additions to the paper are switched off so the two solvers are comparable: its
"act_group_aware" reordering (on by default without desc_act) and its RTN fallback for modules that see
little calibration data (meant for MoE routing). What it writes is kept as is (the standard "gptq"
format), except generation_config.json, where it sets `do_sample: true`: ours is greedy like every
lmforge checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import torch

from lifecycle.checkpoint import Checkpoint
from lifecycle.errors import ConfigError
from quant.config import QuantConfig


def quantize_with_gptqmodel(src: Checkpoint, out_dir: str | Path, cfg: QuantConfig, calib: torch.Tensor, *,
                            calib_source: str, overwrite: bool = False):
    """-> QuantizeOutcome, like quantize.quantize_checkpoint."""
    from quant.formats import save_state
    from quant.quantize import QuantizeOutcome

    if cfg.method != "gptq":
        raise ConfigError(f"--solver gptqmodel: only gptq methods, not {cfg.label}")
    # GPTQModel refuses to start its CPU workers on 2 cores unless told how many to use (shared/NOTES.md).
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    try:
        from gptqmodel import GPTQModel, QuantizeConfig
    except ImportError as err:
        raise ConfigError(f"--solver gptqmodel needs the quant extra (pip install 'lmforge[quant]'): {err}") from None
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    qc = QuantizeConfig(bits=cfg.bits, group_size=cfg.group_size or -1, desc_act=cfg.act_order, sym=cfg.sym,
                        damp_percent=cfg.damp_percent, static_groups=cfg.static_groups,
                        true_sequential=cfg.true_sequential, act_group_aware=False, fallback=None)
    tmp = out_dir.parent / f".{out_dir.name}.gptqmodel-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        try:  # GPTQModel writes per-module logs to ./logs (a hard-coded relative path): keep them out of the user's cwd
            from gptqmodel.looper import loop_processor

            loop_processor._PROJECT_LOG_DIR = tmp / "logs"
        except (ImportError, AttributeError):
            pass
        model = GPTQModel.load(str(src.path), qc, device="cpu")
        rows = [{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in calib]
        t0 = time.perf_counter()
        model.quantize(rows, batch_size=1)
        elapsed = time.perf_counter() - t0
        save_dir = tmp / "saved"
        model.save(str(save_dir))
        state = load_file(str(save_dir / "model.safetensors"))
        config = json.loads((save_dir / "config.json").read_text())
        recipe_config = {"quant": cfg.to_dict(), "solver": "gptqmodel", "calibration": calib_source,
                         "num_calibration_samples": int(calib.shape[0])}
        ckpt = save_state(out_dir, src, state, config, cfg, recipe_config=recipe_config, overwrite=overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return QuantizeOutcome(ckpt, elapsed, int(calib.shape[0]), calib_source)
