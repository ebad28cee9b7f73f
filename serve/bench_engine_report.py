"""What `lmforge bench engine` prints and draws from its report (serve/bench_engine.py): the W1/W2 table, one row per
engine (skipped and failed peers say why in the row), the native low-bit / onnxruntime same-precision ratios, the
W3 / W4 lines, and the bar plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serve.bench_engine import SAME_PRECISION, SPEED_KEYS


def peers_markdown(report: dict[str, Any]) -> str:
    """W1/W2 as a markdown table, one row per engine: skipped and failed peers say why in the row."""
    res = report["results"]
    lines = ["| workload | engine | tokens/s | roofline | TTFT ms | ITL p50 ms | native / engine | greedy agreement |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for workload, key in SPEED_KEYS.items():
        rows = res.get(workload, {})
        for backend, r in rows.items():
            if not isinstance(r, dict):
                continue
            if "skipped" in r or "failed" in r:
                why = r.get("skipped") or "failed: " + r["failed"].splitlines()[0]
                lines.append(f"| {workload.upper()} | {backend} | {why.replace('|', '/')} | | | | | |")
                continue
            ratio = rows.get(f"native_over_{backend}")
            agree = r.get("greedy_agreement")
            runs = r.get(f"runs_{key}")  # the native engine's W1 before and after the others: their mean
            speed = _num(r[key], '.1f') + (f" (mean of {' and '.join(f'{v:.1f}' for v in runs)})" if runs else "")
            lines.append(
                f"| {workload.upper()} | {backend} | {speed} | {_num(r.get('roofline_fraction'), '.1%')} | "
                + (f"{_num(r['ttft_ms'], '.1f')} | {_num(r['itl_median_ms'], '.2f')}" if workload == "w2" else " | ")
                + f" | {f'{ratio:.2f}x' if ratio else ''} | "
                + (f"{agree['identical_fraction']:.0%} identical, {agree['prefix_fraction']:.1%} of tokens "
                   "before the first difference" if agree else "") + " |")
    pairs = [(workload, key, ours, theirs) for workload, key in SPEED_KEYS.items() for ours, theirs in SAME_PRECISION
             if f"{ours}_over_{theirs}" in res.get(workload, {})]
    if pairs:
        lines += ["", "| workload | native low-bit | onnxruntime | native tokens/s | onnxruntime tokens/s | native / onnxruntime |",
                  "|---|---|---|---:|---:|---:|"]
        for workload, key, ours, theirs in pairs:
            rows = res[workload]
            lines.append(f"| {workload.upper()} | {ours} | {theirs} | {rows[ours][key]:.1f} | {rows[theirs][key]:.1f} | "
                         f"{rows[f'{ours}_over_{theirs}']:.2f}x |")
    return "\n".join(lines) + "\n"


def _num(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def print_report(report: dict[str, Any]) -> None:
    res = report["results"]
    print(f"\nfp32 matmul {report['machine']['fp32_matmul_gflops']:.0f} GFLOP/s, "
          f"{report['flops_per_token'] / 1e6:.0f} MFLOP/token")
    if any(w in res for w in SPEED_KEYS):
        print(peers_markdown(report))
    w3 = res.get("w3", {}).get("native", {})
    if "speedup" in w3:
        print(f"W3 native        speculative {w3['speculative']['tokens_per_s']:.1f} vs plain "
              f"{w3['plain']['tokens_per_s']:.1f} tok/s: speedup {w3['speedup']:.2f}x, "
              f"{w3['speculative']['tokens_per_step']:.2f} tokens/step, acceptance {w3['acceptance_rate'] or 0:.2f}, "
              f"identical outputs: {w3['outputs_identical']}")
    if "w4" in res:
        r = res["w4"]["native"]
        print(f"W4 native        TTFT cold {r['ttft_cold_ms']:.1f} ms, warm {r['ttft_warm_ms']:.1f} ms "
              f"(warm/cold {r['warm_over_cold']:.3f})")


def plot(report: dict[str, Any], png: Path) -> None:
    from lifecycle.plots import new_figure, save_figure

    res = report["results"]
    fig, axes = new_figure(1, 2, figsize=(11, 3.8))
    for ax, (name, label) in zip(axes, (("w1", "W1 output tokens/s"), ("w2", "W2 decode tokens/s (1 stream)"))):
        rows = {b: r[SPEED_KEYS[name]] for b, r in res.get(name, {}).items()
                if isinstance(r, dict) and r.get(SPEED_KEYS[name])}  # skipped and failed peers have no bar
        colors = ["#3b7dd8" if b == "native" else "#999999" for b in rows]
        ax.bar(list(rows), list(rows.values()), color=colors)
        ax.tick_params(axis="x", labelrotation=20)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    save_figure(fig, png)
