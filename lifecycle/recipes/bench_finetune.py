"""`lmforge bench sft` / `lmforge bench dpo`: our recipe next to a plain TRL script, same model and batches.

The legs run in one process, never concurrently (NOTES.md), and interleaved: `--repeats` rounds, each
running both legs from scratch, the order alternating (ours-plain, plain-ours, ...) so that a machine
getting slower or faster over the run weighs on both legs alike. The lmforge leg is the recipe
(`sft()` / `dpo()`: our data reading, mixing, encoding, callbacks, final checkpoint); the plain leg is
what a TRL user writes: a `datasets` Dataset of conversational records handed to SFTTrainer
(`assistant_only_loss=True`) or DPOTrainer (`precompute_ref_log_probs=True`) with the same hyperparameters.
A callback stamps `time.perf_counter()` at every optimizer step end in both legs; a leg's s/step is the
median over its steps after `warmup_steps`; tokens/s is TRL's own `num_tokens` count over the same steps.
Each round gives ratio = lmforge s/step / plain s/step (adjacent legs, so the drift between rounds
cancels); overhead_pct = 100 * (median ratio over rounds - 1).
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from lifecycle.data.manifest import check_output_file
from lifecycle.errors import ConfigError

DEFAULT_DATA = {"sft": ["sft/llamafactory/alpaca_en_demo.json", "sft/llamafactory/alpaca_zh_demo.json"],
                "dpo": ["preference/llamafactory/dpo_en_demo.json", "preference/llamafactory/dpo_zh_demo.json"]}


@dataclass
class BenchFinetuneConfig:
    init_from: str | None = field(default=None, metadata={"help": "checkpoint to fine-tune (default: a fresh "
                                  "--preset model with --tokenizer)"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer for a fresh --preset model"})
    preset: str = field(default="small", metadata={"help": "model size when --init-from is not given"})
    data: list[str] = field(default_factory=list, metadata={"help": "data files (default: LLaMA-Factory's "
                            "English and Chinese demos under --data-root)"})
    data_root: str = field(default="../shared/data", metadata={"help": "where the default data files are"})
    steps: int = field(default=12, metadata={"help": "optimizer steps per leg"})
    warmup_steps: int = field(default=2, metadata={"help": "steps left out of the timing"})
    micro_batch_size: int = field(default=2, metadata={"help": "examples per forward"})
    global_batch_size: int = field(default=4, metadata={"help": "examples per optimizer step"})
    max_len: int = field(default=256, metadata={"help": "max tokens per example"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate of both legs"})
    repeats: int = field(default=3, metadata={"help": "rounds of both legs, interleaved (order alternates); the "
                         "overhead is the median of the per-round ratios"})
    output: str = field(default="runs/bench/finetune.json", metadata={"help": "JSON report"})

    def __post_init__(self) -> None:
        check_output_file(self.output)
        for name in ("steps", "micro_batch_size", "global_batch_size", "max_len", "repeats"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"--warmup-steps must be in [0, --steps), got {self.warmup_steps}")
        if self.init_from is None and self.tokenizer is None:
            raise ConfigError("give --init-from CHECKPOINT or --tokenizer DIR (for a fresh --preset model)")


def _timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.stamps: list[float] = [time.perf_counter()]
            self.tokens: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.stamps = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            self.stamps.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "num_tokens" in logs and "eval_loss" not in logs:
                self.tokens.append(float(logs["num_tokens"]))

    return StepTimer()


def _summary(timer, warmup: int, losses: list[float]) -> dict[str, Any]:
    per_step = [b - a for a, b in zip(timer.stamps, timer.stamps[1:])][warmup:]
    tokens = timer.tokens[-1] - timer.tokens[warmup - 1] if warmup and len(timer.tokens) > warmup else \
        (timer.tokens[-1] if timer.tokens else 0.0)
    return {"median_s_per_step": statistics.median(per_step), "mean_s_per_step": statistics.fmean(per_step),
            "tokens_per_s": tokens / sum(per_step), "final_loss": losses[-1] if losses else None}


def _same_examples(stage: str, common: dict[str, Any], tokenizer, work: Path) -> list[Any]:
    """The records the recipe trained on, as records, in the recipe's order: the same mix (seeded), the same
    too-long examples left out, so both legs see the same batches (same seed, same sampler, same length)."""
    from lifecycle.data.formats import read_conversations, read_preferences
    from lifecycle.recipes.posttrain import mix_sources

    if stage == "sft":
        from lifecycle.recipes.sft import SFTRecipeConfig, encode_sft

        cfg = SFTRecipeConfig(output_dir=str(work / "plain-data"), **common)
        fits, read = (lambda c: c if encode_sft(tokenizer, c, cfg) is not None else None), read_conversations
    else:
        from lifecycle.recipes.dpo import DPORecipeConfig, encode_dpo

        cfg = DPORecipeConfig(output_dir=str(work / "plain-data"), **common)
        fits, read = (lambda p: p if encode_dpo(tokenizer, p, cfg) is not None else None), read_preferences
    return mix_sources(cfg, read, fits, lambda _: 0, repr, work / "plain-data", extra={}).train


def bench_finetune(stage: Literal["sft", "dpo"], cfg: BenchFinetuneConfig) -> dict[str, Any]:
    """Run both legs in a temporary directory (removed afterwards); write and return the report."""
    import shutil

    work = Path(tempfile.mkdtemp(prefix=f"bench-{stage}-"))
    try:
        return _bench(stage, cfg, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _bench(stage: Literal["sft", "dpo"], cfg: BenchFinetuneConfig, work: Path) -> dict[str, Any]:
    import torch

    from lifecycle.checkpoint import load_checkpoint, save_checkpoint

    data = cfg.data or [str(Path(cfg.data_root) / p) for p in DEFAULT_DATA[stage]]
    if cfg.init_from:
        base = load_checkpoint(cfg.init_from)
    else:
        from transformers import LlamaForCausalLM

        from lifecycle.presets import resolve_model_config
        from lifecycle.tokenizer import load_tokenizer

        tok = load_tokenizer(cfg.tokenizer)
        mc = resolve_model_config(cfg.preset, None, vocab_size=len(tok))
        torch.manual_seed(0)
        model = LlamaForCausalLM(mc.to_hf(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                          pad_token_id=tok.pad_token_id))
        base = save_checkpoint(work / "base", model, tok, recipe="bench-init", recipe_config=asdict(cfg))
    common = dict(init_from=str(base.path), data=data, max_len=cfg.max_len, micro_batch_size=cfg.micro_batch_size,
                  global_batch_size=cfg.global_batch_size, max_steps=cfg.steps, learning_rate=cfg.learning_rate,
                  eval_fraction=0.0, eval_every=0, save_every=cfg.steps, warmup_ratio=0.0, progress=False)
    tokenizer = base.load_tokenizer()
    examples = _same_examples(stage, common, tokenizer, work)
    legs = {"lmforge": lambda r: _ours_leg(stage, cfg, common, work / f"lmforge-{r}"),
            "plain_trl": lambda r: _plain_leg(stage, cfg, base, tokenizer, examples, work / f"plain-{r}")}
    rounds: list[dict[str, Any]] = []
    for r in range(cfg.repeats):
        order = ("lmforge", "plain_trl") if r % 2 == 0 else ("plain_trl", "lmforge")
        result: dict[str, Any] = {"order": list(order)}
        for name in order:
            print(f"round {r + 1}/{cfg.repeats}: {name}", flush=True)
            result[name] = legs[name](r)
        result["ratio"] = result["lmforge"]["median_s_per_step"] / result["plain_trl"]["median_s_per_step"]
        rounds.append(result)
    ratio = statistics.median(x["ratio"] for x in rounds)
    summary = {name: {key: statistics.median(x[name][key] for x in rounds)
                      for key in ("median_s_per_step", "mean_s_per_step", "tokens_per_s")}
               | {"final_loss": rounds[-1][name]["final_loss"]} for name in legs}
    report = {"benchmark": stage, "config": asdict(cfg), "data": data,
              "base": cfg.init_from or f"fresh {cfg.preset} model (seed 0)",
              "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
              "lmforge": summary["lmforge"], "plain_trl": summary["plain_trl"], "rounds": rounds,
              "ratios": [x["ratio"] for x in rounds], "median_ratio": ratio, "overhead_pct": 100 * (ratio - 1),
              "method": __doc__.split("\n\n", 1)[1].strip()}
    from lifecycle.data.manifest import atomic_write_text

    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.output, json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("benchmark", "lmforge", "plain_trl", "ratios", "overhead_pct")},
                     indent=2))
    return report


def _ours_leg(stage: str, cfg: BenchFinetuneConfig, common: dict[str, Any], out: Path) -> dict[str, Any]:
    """The recipe, with the step timer added to its callbacks; a fresh output dir (no resume)."""
    import transformers

    timer = _timer()
    real_init = transformers.Trainer.__init__

    def init_with_timer(self, *args, **kwargs):
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), timer]
        real_init(self, *args, **kwargs)

    transformers.Trainer.__init__ = init_with_timer
    try:
        if stage == "sft":
            from lifecycle.recipes.sft import SFTRecipeConfig, sft

            sft(SFTRecipeConfig(output_dir=str(out), **common))
        else:
            from lifecycle.recipes.dpo import DPORecipeConfig, dpo

            dpo(DPORecipeConfig(output_dir=str(out), **common))
    finally:
        transformers.Trainer.__init__ = real_init
    losses = [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(ln)]
    import shutil

    shutil.rmtree(out, ignore_errors=True)  # a checkpoint per round would fill the disk on a large preset
    return _summary(timer, cfg.warmup_steps, losses)


def _plain_leg(stage: str, cfg: BenchFinetuneConfig, base, tokenizer, examples: list[Any], out: Path
               ) -> dict[str, Any]:
    """What a TRL user writes: conversational records, TRL tokenizes, the same hyperparameters."""
    import torch
    from datasets import Dataset

    model = base.load_model(dtype=torch.float32)
    timer = _timer()
    args = dict(output_dir=str(out), use_cpu=not torch.cuda.is_available(), bf16=False,
                per_device_train_batch_size=cfg.micro_batch_size,
                gradient_accumulation_steps=cfg.global_batch_size // cfg.micro_batch_size, max_steps=cfg.steps,
                learning_rate=cfg.learning_rate, lr_scheduler_type="cosine", logging_steps=1, save_strategy="no",
                report_to=[], disable_tqdm=True, max_length=cfg.max_len, seed=0)
    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        rows = [{"messages": c.as_dicts()} for c in examples]
        trainer = SFTTrainer(model=model, args=SFTConfig(assistant_only_loss=True, **args), processing_class=tokenizer,
                             train_dataset=Dataset.from_list(rows), callbacks=[timer])
    else:
        from trl import DPOConfig, DPOTrainer

        rows = [{"prompt": [{"role": m.role, "content": m.content} for m in p.prompt],
                 "chosen": [{"role": "assistant", "content": p.chosen}],
                 "rejected": [{"role": "assistant", "content": p.rejected}]} for p in examples]
        trainer = DPOTrainer(model=model, args=DPOConfig(precompute_ref_log_probs=True, **args),
                             processing_class=tokenizer, train_dataset=Dataset.from_list(rows), callbacks=[timer])
    trainer.train()
    return _summary(timer, cfg.warmup_steps, [r["loss"] for r in trainer.state.log_history if "loss" in r])


def add_action(actions: Any) -> None:
    from lifecycle.cli import add_subcommand
    from lifecycle.config import add_config_arguments, config_from_args

    for stage in ("sft", "dpo"):
        parser = add_subcommand(
            actions, stage, help=f"{stage.upper()} s/step and tokens/s: the lmforge recipe next to a plain TRL script",
            description=__doc__,
            example=f"lmforge bench {stage} --init-from runs/small/final --data-root ../shared/data --steps 12")
        add_config_arguments(parser, BenchFinetuneConfig)
        parser.set_defaults(func=lambda args, stage=stage: bool(bench_finetune(stage, config_from_args(
            BenchFinetuneConfig, args))) and 0)
