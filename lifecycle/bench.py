"""`lmforge bench`: throughput measurements recorded in docs/BENCHMARKS.md.

`bench pretrain` runs the real `pretrain()` recipe and a minimal pure-PyTorch loop on the same model,
seed, packed blocks, optimizer and batch, one after the other in one process (never concurrently: two
benchmarks on 2 cores distort each other by 2-8x, see NOTES.md), and reports tokens/s of each and the
recipe's overhead. `bench` is a group so later actions (`bench engine`, `bench serve`) sit beside it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lifecycle.data.manifest import check_output_file
from lifecycle.errors import ConfigError, LmforgeError
from lifecycle.recipes.pretrain import PretrainConfig, PackedData, block_indices, prepare_data, pretrain

METHOD = (
    "lmforge: pretrain() with --log-every 1; each step's seconds are tokens_per_step / the tokens_per_s it "
    "writes to metrics.jsonl (wall time between consecutive metric lines: forward, backward, clip, optimizer "
    "step, loss sync, logging), so data preparation and checkpoint writes are outside every step. Held-out "
    "evaluation is off (eval fraction 0), and steps that still logged an eval would be dropped. "
    "plain_pytorch: time.perf_counter around each optimizer step of the loop in lifecycle/bench.py. Both skip "
    "the first warmup_steps steps; mean is the arithmetic mean of the per-step values. "
    "overhead_pct = 100 * (lmforge median s/step / plain median s/step - 1)."
)


@dataclass
class BenchPretrainConfig:
    preset: str = field(default="small", metadata={"help": "model size: draft, tiny, small, base, 1b"})
    data: list[str] = field(default_factory=list, metadata={"help": "training text (default: the stdlib documentation corpus, built and cached)"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer directory (required with --data; default: one trained on the stdlib corpus and cached)"})
    seq_len: int = field(default=256, metadata={"help": "tokens per packed sequence"})
    micro_batch_size: int = field(default=8, metadata={"help": "sequences per forward pass"})
    global_batch_size: int = field(default=16, metadata={"help": "sequences per optimizer step"})
    steps: int = field(default=10, metadata={"help": "optimizer steps per run"})
    warmup_steps: int = field(default=2, metadata={"help": "first steps of each run left out of the measurement (allocator and thread-pool warmup)"})
    seed: int = field(default=0, metadata={"help": "seed for initialization and data order (same for both runs)"})
    output: str = field(default="runs/bench/pretrain.json", metadata={"help": "JSON report to write"})
    plot: bool = field(default=False, metadata={"help": "also write a bar chart PNG next to the JSON"})

    def __post_init__(self) -> None:
        check_output_file(self.output)
        for name in ("seq_len", "micro_batch_size", "global_batch_size", "steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"--global-batch-size {self.global_batch_size} is not a multiple of "
                              f"--micro-batch-size {self.micro_batch_size}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"--warmup-steps {self.warmup_steps} must be in [0, --steps {self.steps}): "
                              "at least one step must be measured")
        if self.data and not self.tokenizer:
            raise ConfigError("--data needs --tokenizer (the default tokenizer belongs to the default corpus)")


@dataclass
class RunTiming:
    """Seconds of each optimizer step (1-based step -> s) of one run, and its last training loss."""

    step_s: dict[int, float]
    final_loss: float
    wall_s: float  # the whole run, data preparation and checkpoint writes included (context only)


def summarize(timing: RunTiming, tokens_per_step: int, warmup_steps: int) -> dict[str, Any]:
    """Median and mean tokens/s and s/step over the steps after `warmup_steps`."""
    measured = {s: t for s, t in sorted(timing.step_s.items()) if s > warmup_steps}
    if not measured:
        raise LmforgeError(f"no step after the {warmup_steps} warmup steps was timed; raise --steps")
    secs = list(measured.values())
    tps = [tokens_per_step / t for t in secs]
    return {"tokens_per_s_median": statistics.median(tps), "tokens_per_s_mean": statistics.mean(tps),
            "s_per_step_median": statistics.median(secs), "s_per_step_mean": statistics.mean(secs),
            "measured_steps": list(measured), "tokens_per_s_by_step": [round(v, 2) for v in tps],
            "final_loss": timing.final_loss, "wall_s_total": round(timing.wall_s, 2)}


def run_lmforge(pcfg: PretrainConfig) -> RunTiming:
    """The real recipe; step times read back from its metrics.jsonl (see METHOD)."""
    started = time.perf_counter()
    pretrain(pcfg)
    wall_s = time.perf_counter() - started
    records = [json.loads(ln) for ln in (Path(pcfg.output_dir) / "metrics.jsonl").read_text().splitlines() if ln]
    tokens_per_step = pcfg.global_batch_size * pcfg.seq_len
    step_s = {r["step"]: tokens_per_step / r["tokens_per_s"] for r in records if "eval_loss" not in r}
    return RunTiming(step_s=step_s, final_loss=records[-1]["loss"], wall_s=wall_s)


def run_plain(pcfg: PretrainConfig, tokenizer, data: PackedData) -> RunTiming:
    """A minimal loop: same model, init seed, batches, AdamW groups and schedule as the recipe; no accelerate."""
    from transformers import LlamaForCausalLM, get_cosine_with_min_lr_schedule_with_warmup

    from lifecycle.presets import resolve_model_config

    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hf_config = resolve_model_config(pcfg.preset, vocab_size=len(tokenizer)).to_hf(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(pcfg.seed)
    model = LlamaForCausalLM(hf_config).to(device)
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": pcfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # no decay on norms
    optimizer = torch.optim.AdamW(groups, lr=pcfg.learning_rate, betas=(pcfg.beta1, pcfg.beta2), eps=1e-8)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(  # a torch LambdaLR: the same LR per step
        optimizer, num_warmup_steps=pcfg.warmup_steps, num_training_steps=pcfg.max_steps, min_lr_rate=pcfg.min_lr_ratio)
    accum = pcfg.global_batch_size // pcfg.micro_batch_size
    model.train()
    step_s: dict[int, float] = {}
    loss_value = math.nan
    for step in range(pcfg.max_steps):
        t0 = time.perf_counter()
        idx = block_indices(step, len(data.train), pcfg.global_batch_size, pcfg.seed)
        step_loss = torch.zeros((), device=device)
        for micro in range(accum):
            rows = idx[micro * pcfg.micro_batch_size:(micro + 1) * pcfg.micro_batch_size]
            ids = torch.from_numpy(data.train[rows].astype(np.int64)).to(device)  # (micro_batch, seq_len)
            loss = model(input_ids=ids, labels=ids).loss / accum
            loss.backward()
            step_loss += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), pcfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(step_loss)  # the recipe reads the loss every step too (and it syncs a GPU)
        step_s[step + 1] = time.perf_counter() - t0
    return RunTiming(step_s=step_s, final_loss=loss_value, wall_s=time.perf_counter() - started)


def default_data(cache_dir: Path) -> tuple[Path, Path]:
    """The stdlib documentation corpus and an 8k BPE tokenizer on it (the demo's), built once per
    interpreter version; returns (train.jsonl, tokenizer dir)."""
    from lifecycle.demo import prepare_default_data

    root = cache_dir / "bench" / f"stdlib-py{platform.python_version()}"
    train_file, _ = prepare_default_data(root, vocab_size=8192, progress=False)
    return train_file, root / "tokenizer"


def machine_info() -> dict[str, Any]:
    import transformers

    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": cpu_model, "num_cpu_cores": os.cpu_count(), "torch_num_threads": torch.get_num_threads(),
            "torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "python_version": platform.python_version(), "platform": platform.platform(),
            "device": "cuda:" + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def command_line(cfg: BenchPretrainConfig) -> str:
    """The flags that reproduce `cfg` (every field spelled out)."""
    parts = ["lmforge", "bench", "pretrain"]
    for f in fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts += [flag] if value else []
        elif isinstance(value, list):
            parts += [flag, *value] if value else []
        elif value is not None:
            parts += [flag, str(value)]
    return " ".join(parts)


def bench_pretrain(cfg: BenchPretrainConfig, cache_dir: Path | None = None) -> dict[str, Any]:
    """Run both loops sequentially, write the JSON report (and PNG with `plot`); returns the report."""
    from lifecycle.data.manifest import atomic_write_text
    from lifecycle.demo import DEFAULT_CACHE
    from lifecycle.tokenizer import load_tokenizer, tokenizer_hash

    if cfg.data:
        data_files, tok_dir = list(cfg.data), Path(cfg.tokenizer)  # type: ignore[arg-type]  # checked in config
    else:
        train_file, default_tok = default_data(cache_dir or DEFAULT_CACHE)
        data_files, tok_dir = [str(train_file)], Path(cfg.tokenizer) if cfg.tokenizer else default_tok
    threads_before = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        # Held-out evaluation off (eval_fraction 0, no eval data: evaluate() returns at once), checkpoints
        # only at the end, no LR warmup (the schedule does not change the work of a step).
        pcfg = PretrainConfig(
            data=data_files, tokenizer=str(tok_dir), preset=cfg.preset, output_dir=str(Path(tmp) / "run"),
            seq_len=cfg.seq_len, micro_batch_size=cfg.micro_batch_size, global_batch_size=cfg.global_batch_size,
            max_steps=cfg.steps, warmup_steps=0, precision="fp32", eval_every=0, eval_fraction=0.0, save_every=0,
            keep_last=1, log_every=1, seed=cfg.seed, progress=False)
        print(f"[bench] lmforge pretrain(): {cfg.steps} steps", flush=True)
        lmforge_run = run_lmforge(pcfg)
        tokenizer = load_tokenizer(tok_dir)
        # A cache hit: the blocks the recipe just packed into its run directory.
        data = prepare_data(pcfg, tokenizer, tokenizer_hash(tok_dir), Path(pcfg.output_dir) / "data")
        print(f"[bench] plain PyTorch loop: {cfg.steps} steps", flush=True)
        plain_run = run_plain(pcfg, tokenizer, data)
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    runs = {"lmforge": summarize(lmforge_run, tokens_per_step, cfg.warmup_steps),
            "plain_pytorch": summarize(plain_run, tokens_per_step, cfg.warmup_steps)}
    lm, plain = runs["lmforge"], runs["plain_pytorch"]
    report = {
        "benchmark": "pretrain", "command": command_line(cfg), "config": asdict(cfg),
        "machine": machine_info() | {"torch_num_threads_before_runs": threads_before},
        "workload": {"tokens_per_step": tokens_per_step, "train_blocks": int(len(data.train)),
                     "accumulation_steps": cfg.global_batch_size // cfg.micro_batch_size, "precision": "fp32",
                     "data": data_files, "tokenizer": str(tok_dir), "vocab_size": len(tokenizer)},
        "method": METHOD, "order": ["lmforge", "plain_pytorch"], "runs": runs,
        "ratio_tokens_per_s": lm["tokens_per_s_median"] / plain["tokens_per_s_median"],
        "overhead_pct": 100 * (lm["s_per_step_median"] / plain["s_per_step_median"] - 1),
        "final_loss_diff": abs(lm["final_loss"] - plain["final_loss"]),
    }
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    if cfg.plot:
        plot_report(report, out.with_suffix(".png"))
    print_report(report, out)
    return report


def print_report(report: dict[str, Any], out: Path) -> None:
    c = report["config"]
    print(f"\npretrain throughput: preset {c['preset']}, seq {c['seq_len']}, batch {c['global_batch_size']} "
          f"(micro {c['micro_batch_size']}), {len(report['runs']['lmforge']['measured_steps'])} measured steps "
          f"of {c['steps']}, {report['machine']['cpu_model']} x{report['machine']['torch_num_threads']} threads")
    print(f"{'run':<15}{'tok/s median':>14}{'tok/s mean':>12}{'s/step median':>15}{'final loss':>12}")
    for name, r in report["runs"].items():
        print(f"{name:<15}{r['tokens_per_s_median']:>14.1f}{r['tokens_per_s_mean']:>12.1f}"
              f"{r['s_per_step_median']:>15.3f}{r['final_loss']:>12.4f}")
    print(f"lmforge / plain tokens/s: {report['ratio_tokens_per_s']:.3f} (overhead {report['overhead_pct']:+.1f}%)")
    print(f"wrote {out}")


def plot_report(report: dict[str, Any], png_path: Path) -> None:
    from lifecycle.plots import new_figure, save_figure

    names = list(report["runs"])
    medians = [report["runs"][n]["tokens_per_s_median"] for n in names]
    fig, ax = new_figure(figsize=(5, 4))
    bars = ax.bar(names, medians, color=["tab:blue", "tab:gray"])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel("tokens/s (median over measured steps)")
    c = report["config"]
    ax.set_title(f"pretrain {c['preset']}, seq {c['seq_len']}, batch {c['global_batch_size']}\n"
                 f"{report['machine']['cpu_model']}", fontsize=9)
    save_figure(fig, png_path)


# -------------------------------------------------------------------------------------------- CLI


def add_command(sub: Any) -> None:
    from lifecycle.cli import add_subcommand
    from lifecycle.config import add_config_arguments

    group = add_subcommand(sub, "bench", help="measure throughput (numbers for docs/BENCHMARKS.md)",
                           example="lmforge bench pretrain --preset small --plot")
    actions = group.add_subparsers(title="actions", metavar="ACTION")
    parser = add_subcommand(
        actions, "pretrain", help="pretraining tokens/s: the pretrain recipe next to a plain PyTorch loop",
        description=("Run the pretrain recipe and a minimal PyTorch loop (same model, seed, batches, AdamW, "
                     "gradient accumulation and clipping) one after the other, and write tokens/s of each, "
                     "the ratio, the final losses and the machine to a JSON report."),
        example="lmforge bench pretrain --preset small --steps 10 --warmup-steps 2 --plot")
    add_config_arguments(parser, BenchPretrainConfig)
    parser.set_defaults(func=_run_pretrain)
    from lifecycle.data.curate.bench import add_bench_action  # `bench curate` (issue 7)

    add_bench_action(actions)
    from serve.bench_engine import add_action  # the engine's workloads live with the engine

    add_action(actions)
    from serve.bench_serve import add_action as add_serve_action  # gRPC clients vs the in-process engine

    add_serve_action(actions)
    from lifecycle.draft_agreement import add_action as add_draft_action

    add_draft_action(actions)
    from lifecycle.recipes.bench_finetune import add_action as add_finetune_actions

    add_finetune_actions(actions)


def _run_pretrain(args: Any) -> int:
    from lifecycle.config import config_from_args

    bench_pretrain(config_from_args(BenchPretrainConfig, args))
    return 0
