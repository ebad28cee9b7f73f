"""What `lmforge bench serve` writes: a markdown table (also printed) and a PNG of throughput and p50/p99
latency against the number of clients. The JSON is the report dict itself (serve/bench_serve/run.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _num(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _pair(stats: dict[str, float | None]) -> str:
    return f"{_num(stats.get('p50'), '.1f')} / {_num(stats.get('p99'), '.1f')}"


def serve_markdown(report: dict[str, Any]) -> str:
    """One row per backend and N: the gRPC numbers, the in-process throughput and the ratio."""
    lines = ["| backend | clients | requests | errors | gRPC tok/s | in-process tok/s | gRPC / in-process | "
             "TTFT p50 / p99 ms | ITL p50 / p99 ms | in-process TTFT p50 / p99 ms | in-process ITL p50 / p99 ms | "
             "CPU s: server + client / in-process |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for backend, result in report["results"].items():
        for level in result["levels"]:
            g, p = level["grpc"], level.get("in_process") or {}
            errors = ", ".join(f"{k} {v}" for k, v in g["errors"].items()) or "0"
            if g["num_wrong_length"]:
                errors += f"; {g['num_wrong_length']} wrong length"
            ratio = level.get("grpc_over_in_process")
            lines.append(
                f"| {backend} | {level['concurrency']} | {g['num_requests']} | {errors} | "
                f"{_num(g['output_tokens_per_s'], '.1f')} | {_num(p.get('output_tokens_per_s'), '.1f')} | "
                f"{_num(ratio, '.1%')} | {_pair(g['ttft_ms'])} | {_pair(g['itl_ms'])} | "
                f"{_pair(p['ttft_ms']) if p else ''} | {_pair(p['itl_ms']) if p else ''} | "
                f"{_num(g.get('server_cpu_s'), '.1f')} + {_num(g['client_cpu_s'], '.1f')} / {_num(p.get('cpu_s'), '.1f')} |")
    return "\n".join(lines) + "\n"


def goals_text(report: dict[str, Any]) -> str:
    out = []
    for backend, goals in report.get("goals", {}).items():
        ratio = goals.get("grpc_over_in_process_at_64")
        if ratio is not None:
            out.append(f"{backend}: gRPC / in-process at 64 clients {ratio:.1%} (goal >= 90%: "
                       f"{'met' if ratio >= 0.9 else 'NOT met'})")
        if goals.get("failed_at_256") is not None:
            failed = goals["failed_at_256"]
            out.append(f"{backend}: 256 clients, {failed} failed or short requests (goal 0: "
                       f"{'met' if failed == 0 else 'NOT met'})")
    return "\n".join(out)


def plot_serve(report: dict[str, Any], png: Path) -> None:
    """Three panels against N (log scale): output tokens/s, TTFT p50/p99, inter-token latency p50/p99."""
    from lifecycle.plots import new_figure, save_figure

    fig, axes = new_figure(1, 3, figsize=(14, 4))
    colors = ["#3b7dd8", "#d8763b", "#3bd87a", "#8a3bd8"]
    for color, (backend, result) in zip(colors, report["results"].items()):
        levels = result["levels"]
        ns = [lv["concurrency"] for lv in levels]
        for side, style in (("grpc", "-"), ("in_process", "--")):
            rows = [lv.get(side) for lv in levels]
            if not all(rows):
                continue
            label = f"{backend} {'gRPC' if side == 'grpc' else 'in-process'}"
            axes[0].plot(ns, [r["output_tokens_per_s"] for r in rows], style, marker="o", color=color, label=label)
            for ax, key in ((axes[1], "ttft_ms"), (axes[2], "itl_ms")):
                for q, marker in (("p50", "o"), ("p99", "^")):
                    values = [r[key][q] for r in rows]
                    if all(v is not None for v in values):
                        ax.plot(ns, values, style, marker=marker, color=color, label=f"{label} {q}")
    titles = ("output tokens/s", "time to first token (ms)", "inter-token latency (ms)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[1:]:
        ax.set_yscale("log")
    w = report["workload"]
    fig.suptitle(f"lmforge bench serve: {Path(report['model'] or '?').name}, prompt {w['prompt_len']} / "
                 f"output {w['output_len']} tokens, greedy, EOS ignored", fontsize=9)
    save_figure(fig, png)
