"""Plots people look at (loss curves, benchmark bars) are written the same way: headless, atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def new_figure(*args: Any, **kwargs: Any):
    """`plt.subplots` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees half a PNG."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)


def plot_loss_curve(metrics_path: Path, png_path: Path, title: str) -> None:
    """Training loss per step and held-out loss where evaluated."""
    records = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    fig, ax = new_figure(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss")
    evals = [r for r in records if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("nats/token (held-out: cross-entropy)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, png_path)


def plot_metrics(metrics_path: Path, png_path: Path, keys: list[str] | tuple[str, ...], title: str) -> None:
    """One panel per metric key (train values as a line, `eval_<key>` values as dots) from metrics.jsonl."""
    records = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    keys = [k for k in keys if any(k in r or f"eval_{k}" in r for r in records)]
    if not keys:
        return
    fig, axes = new_figure(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        train = [r for r in records if key in r]
        held = [r for r in records if f"eval_{key}" in r]
        if train:
            ax.plot([r["step"] for r in train], [r[key] for r in train], label="train")
        if held:
            ax.plot([r["step"] for r in held], [r[f"eval_{key}"] for r in held], "o-", label="held-out")
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    save_figure(fig, png_path)
