"""What a quantization cost: perplexity before/after on held-out text, size against fp16, decode speed
in our engine. One row per method; written as JSON + markdown (atomically) and plotted size vs perplexity."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from quant.formats import dequantized_state_dict


def atomic_write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, *, desc: str = "perplexity", progress: bool = True) -> float:
    """exp(mean NLL) of every token after the first of each (num_blocks, seq_len) block."""
    from tqdm.auto import tqdm

    total_nll, count = 0.0, 0
    for row in tqdm(blocks, desc=desc, unit="block", disable=not progress, leave=False):
        logits = model(row[None]).logits[0, :-1].float()  # (seq - 1, vocab)
        nll = torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum")
        total_nll, count = total_nll + float(nll), count + row.numel() - 1
    return math.exp(total_nll / count)


def load_dequantized(parent_path: Path, quantized_path: Path):
    """The parent's architecture with the quantized checkpoint's weights, dequantized to fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(parent_path, dtype=torch.float32, use_safetensors=True)
    missing, unexpected = model.load_state_dict(dequantized_state_dict(quantized_path), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not model.config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"{quantized_path}: state dict mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    return model.eval()


def sizes(parent_config: dict[str, Any], quantized_path: Path) -> dict[str, Any]:
    """Bytes of the quantized checkpoint's weights vs the same model in fp16, whole and linears only."""
    from safetensors import safe_open

    linear_bytes = other_bytes = linear_params = 0
    markers = (".qweight", ".qzeros", ".scales", ".g_idx", ".SCB", "_proj.weight")
    with safe_open(str(quantized_path / "model.safetensors"), "pt") as f:
        for key in f.keys():
            t = f.get_slice(key)
            numel = math.prod(t.get_shape())
            nbytes = numel * {"F16": 2, "BF16": 2, "F32": 4, "I32": 4, "I8": 1, "U8": 1, "I64": 8}[t.get_dtype()]
            if ".layers." in key and (any(m in key for m in markers) or ".weight." in key):
                linear_bytes += nbytes
            else:
                other_bytes += nbytes
    c = parent_config
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    heads = c["num_attention_heads"]
    hd = c.get("head_dim") or h // heads
    kv = c.get("num_key_value_heads") or heads
    linear_params = layers * (h * (heads + 2 * kv) * hd + heads * hd * h + 3 * h * inter)
    fp16_linear = 2 * linear_params
    fp16_total = fp16_linear + other_bytes  # the rest is stored in fp16 already
    return {"file_bytes": (quantized_path / "model.safetensors").stat().st_size,
            "linear_bytes": linear_bytes, "fp16_linear_bytes": fp16_linear, "fp16_total_bytes": fp16_total,
            "size_vs_fp16": (linear_bytes + other_bytes) / fp16_total,
            "linear_size_vs_fp16": linear_bytes / fp16_linear}


def decode_speed(model_path: Path, prompt_ids: list[int], num_tokens: int, reference=None) -> dict[str, Any]:
    """Single-stream greedy decode in our engine: tokens/s between the first and the last new token. With a
    `reference` (transformers model: the parent, or the dequantized child, fp32), also the engine's per-token error:
    its logprobs of its own greedy tokens against the reference's on the same tokens (teacher-forced)."""
    from serve.bench_engine import native_stream
    from serve.engine.llm_engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(model=str(model_path), device="cpu", dtype="float32"))
    native_stream(engine, prompt_ids, 4, "warmup")
    start = time.perf_counter()
    engine.add_request("bench", prompt_ids, _greedy(num_tokens))
    stamps = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            stamps += [time.perf_counter()] * sum(len(c.token_ids) for c in out.outputs)
    decode_s = stamps[-1] - stamps[0] if len(stamps) > 1 else float("nan")
    result = {"decode_tokens_per_s": (len(stamps) - 1) / decode_s if decode_s > 0 else None,
              "ttft_s": stamps[0] - start if stamps else None, "engine_path": engine.runner.model.kernel_path}
    if reference is not None:
        result |= engine_logprob_error(engine, reference, prompt_ids, num_tokens)
    return result


def engine_logprob_error(engine, reference, prompt_ids: list[int], num_tokens: int) -> dict[str, Any]:
    """max / mean |logprob(engine) - logprob(reference)| over the engine's greedy tokens, one stream (so one-row
    GEMVs: the path where 4-bit kernels round activations to int8 by default)."""
    from serve.types import SamplingParams

    params = SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True, logprobs=0)
    completion = engine.generate([prompt_ids], params)[0].outputs[0]
    tokens = list(completion.token_ids)
    if not tokens:
        return {}
    got = torch.tensor([lp.chosen.logprob for lp in completion.logprobs], dtype=torch.float64)
    with torch.no_grad():
        logits = reference(torch.tensor([prompt_ids + tokens])).logits[0, len(prompt_ids) - 1:-1].double()
    ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens)[:, None])[:, 0]
    err = (got - ref).abs()
    return {"engine_logprob_error_max": float(err.max()), "engine_logprob_error_mean": float(err.mean()),
            "engine_logprob_tokens": len(tokens)}


def _greedy(n: int):
    from serve.types import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def relative(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after / before - 1


COLUMNS = [("method", "method", "{}"), ("bits", "bits", "{}"), ("group_size", "group", "{}"),
           ("linear_size_vs_fp16", "linears vs fp16", "{:.3f}x"), ("size_vs_fp16", "file vs fp16", "{:.3f}x")]


def markdown(report: dict[str, Any]) -> str:
    sets = report["eval_sets"]
    head = [c[1] for c in COLUMNS]
    for s in sets:
        head += [f"ppl {s} before", f"ppl {s} after", f"Δ {s}", f"KL {s}", f"KL p99 {s}", f"top-1 {s}"]
    head += ["calibration s", "quantize s", "decode tok/s", "engine Δlogprob max", "engine path"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["rows"]:
        cells = [("-" if row.get(k) is None else f.format(row[k])) for k, _, f in COLUMNS]
        for s in sets:
            ev = row.get("perplexity", {}).get(s, {})
            cells += [_f(ev.get("before"), "{:.3f}"), _f(ev.get("after"), "{:.3f}"), _f(ev.get("relative_change"), "{:+.2%}")]
            dv = row.get("divergence", {}).get(s, {})
            cells += [_f(dv.get("kl_mean"), "{:.5f}"), _f(dv.get("kl_p99"), "{:.5f}"), _f(dv.get("top1_agreement"), "{:.2%}")]
        cells += [_f(row.get("calibration_s"), "{:.1f}"), _f(row.get("quantize_s"), "{:.1f}"),
                  _f(row.get("decode_tokens_per_s"), "{:.1f}"), _f(row.get("engine_logprob_error_max"), "{:.1e}"),
                  row.get("engine_path", "-")]
        lines.append("| " + " | ".join(cells) + " |")
    meta = report["meta"]
    text = [f"# lmforge quantize: {meta['checkpoint']}", "",
            f"Calibration: {meta['calibration']} ({meta['num_samples']} x {meta['seq_len']} tokens). "
            f"Perplexity: {meta['eval_blocks']} blocks of {meta['eval_seq_len']} tokens per set, fp32 math on the "
            f"dequantized weights. KL: mean and 99th percentile over those positions of KL(fp32 parent || quantized) of the "
            f"next-token distribution, in nats; top-1: share of positions where both predict the same token. "
            f"Decode: {meta['decode_tokens']} tokens, one stream, our engine on CPU. Engine Δlogprob: the largest "
            f"|logprob in our engine - logprob of fp32 math on the (dequantized) weights| of the engine's greedy tokens "
            f"(one-row 4-bit GEMVs round activations to int8 per 32 columns; LMFORGE_Q4_ACTIVATIONS=fp32: exact).", "",
            *lines, ""]
    return "\n".join(text)


def _f(v: Any, spec: str) -> str:
    return "-" if v is None else spec.format(v)


def plot(report: dict[str, Any], png: Path) -> None:
    """One panel per held-out set: perplexity change vs the fp32 parent against the quantized linears' size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = report["eval_sets"] or ["-"]
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 4), squeeze=False)
    for ax, s in zip(axes[0], sets):
        rows = [r for r in report["rows"] if r.get("perplexity", {}).get(s, {}).get("after") is not None
                and r["bits"] != 32]
        for r in rows:
            x, y = r["linear_size_vs_fp16"], 100 * r["perplexity"][s]["relative_change"]
            ax.scatter([x], [y], marker="s" if r["method"].startswith("rtn") else "o")
            ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axhline(0.0, color="grey", linestyle="--", linewidth=0.8)
        before = rows[0]["perplexity"][s]["before"] if rows else None
        ax.set_title(f"{s}" + (f" (fp32 perplexity {before:.2f})" if before else ""))
        ax.set_xlabel("quantized linears: size vs fp16")
        ax.set_ylabel("perplexity change vs fp32 (%)")
    fig.suptitle("lmforge quantize: size vs perplexity")
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, png)


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    paths = {"json": out_dir / "report.json", "markdown": out_dir / "report.md", "plot": out_dir / "size_vs_perplexity.png"}
    atomic_write(paths["json"], json.dumps(report, indent=2, default=str) + "\n")
    atomic_write(paths["markdown"], markdown(report))
    plot(report, paths["plot"])
    return paths
