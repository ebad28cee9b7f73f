"""Plots people look at (loss curves, benchmark bars) are written the same way: headless, atomically."""

from __future__ import annotations

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
