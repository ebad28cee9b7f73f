"""The evaluation report: one JSON file (written atomically) and a table for the terminal.

    {"lmforge_version": ..., "created": ..., "target": {model, api, ...},
     "tasks": {"arc_easy": {"kind", "task_file", "num_items", "metrics": {"acc": .., "acc_stderr": ..},
                            "num_cached", "num_requested", "num_retries", "elapsed_s",
                            "subjects": {"anatomy": {"num_items": 135, "acc": .., "acc_stderr": ..}, ...},
                            "items": [{"index", "where", "key", "answer", "metrics"}, ...]}}}

"subjects" is there for tasks with a `subject` template (MMLU, CMMLU, C-Eval); the table then gives each
subject's first metric (acc) under the task's rows.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from serve.evaluation.runner import TaskRun


def build_report(target: dict[str, Any], runs: Sequence[TaskRun], *, with_items: bool = True) -> dict[str, Any]:
    from lifecycle import __version__

    tasks = {}
    for run in runs:
        entry: dict[str, Any] = {
            "kind": run.spec.kind, "task_file": run.spec.source, "num_items": len(run.results),
            "metrics": {k: _finite(v) for k, v in run.metrics.items()},
            "num_cached": run.num_cached, "num_requested": run.num_requested, "num_retries": run.num_retries,
            "elapsed_s": round(run.elapsed_s, 3)}
        if run.subjects:
            entry["subjects"] = {name: {k: _finite(v) for k, v in values.items()}
                                 for name, values in run.subjects.items()}
        if with_items:
            entry["items"] = [r.to_json() for r in run.results]
        tasks[run.spec.name] = entry
    return {"lmforge_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "target": target, "tasks": tasks}


def _finite(value: float) -> float | None:
    """JSON has no NaN: an undefined metric (stderr of one item) is null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_report(path: str | Path, report: dict[str, Any]) -> None:
    from lifecycle.data.manifest import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")


# Shown first, in this order; other metrics follow alphabetically. Counts are not metrics.
_ORDER = ("acc", "acc_norm", "exact_match", "token_perplexity", "word_perplexity", "byte_perplexity",
          "bits_per_byte", "bleu", "rouge1", "rouge2", "rougeL")
_COUNTS = ("num_tokens", "num_words", "num_bytes")


def _value_cells(metrics: dict[str, float], name: str) -> tuple[str, str]:
    stderr = metrics.get(f"{name}_stderr")
    return f"{metrics[name]:.4f}", f"{stderr:.4f}" if stderr is not None and math.isfinite(stderr) else ""


def format_table(runs: Sequence[TaskRun]) -> str:
    rows = [("task", "kind", "items", "metric", "value", "± stderr")]
    for run in runs:
        names = [n for n in run.metrics if not n.endswith("_stderr") and n not in _COUNTS]
        names.sort(key=lambda n: (_ORDER.index(n.split("/")[0]) if n.split("/")[0] in _ORDER else len(_ORDER), n))
        for i, name in enumerate(names):
            rows.append((run.spec.name if i == 0 else "", run.spec.kind if i == 0 else "",
                         str(len(run.results)) if i == 0 else "", name, *_value_cells(run.metrics, name)))
        for subject, values in run.subjects.items():  # the task's first metric, subject by subject
            if names and names[0] in values:
                rows.append((f"  {subject}", "", str(values["num_items"]), names[0],
                             *_value_cells(values, names[0])))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    right = {2, 4, 5}
    lines = ["  ".join(cell.rjust(w) if c in right else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths)))
             .rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
