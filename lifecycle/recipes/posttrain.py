"""What SFT, reward modelling and DPO share: flags, data mixing and splitting, model (full / LoRA / QLoRA),
TRL arguments, the run callback (metrics.jsonl, NaN guard, stop-at-step) and the final checkpoint.

The trainers are TRL's (SFTTrainer, RewardTrainer, DPOTrainer); this module is the part around them that
other tools leave to the user: data read from several weighted sources with bad records counted, the mix
actually used written into a dataset manifest, a stable held-out split, learning-rate defaults by the
square-root rule (lifecycle/plan.py), exact resume from the trainer's own checkpoints, a run that stops on
a NaN loss naming the last good checkpoint, and a final lmforge Checkpoint whose manifest links the parent
checkpoint and the dataset manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lifecycle.errors import ConfigError, DataError, LmforgeError

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAINER_DIR = "trainer"  # TRL/transformers checkpoints (checkpoint-N): what resume reads


@dataclass
class FinetuneConfig:
    """Flags every post-training stage has; each stage's config adds its own."""

    data: list[str] = field(default_factory=list, metadata={"help": "training files/directories, each optionally "
                            "weighted: domain.jsonl:0.2,general.jsonl:0.8 (mixed deterministically)"})
    init_from: str | None = field(default=None, metadata={"help": "checkpoint to start from (required)"})
    output_dir: str = field(default="runs/finetune", metadata={"help": "run directory: final/, trainer/, "
                            "metrics.jsonl, dataset_manifest.json, a loss/metric PNG"})
    eval_data: list[str] = field(default_factory=list, metadata={"help": "held-out files; if empty, "
                                 "--eval-fraction of --data is held out (stable hash split)"})
    eval_fraction: float = field(default=0.05, metadata={"help": "share of examples held out when --eval-data is empty"})
    format: str | None = field(default=None, metadata={"help": "force the record format instead of detecting it per file"})
    columns: str | None = field(default=None, metadata={"help": "map your field names to ours: "
                                "instruction=question,output=answer"})
    strict: bool = field(default=False, metadata={"help": "stop on the first bad record (default: skip and count it)"})
    mix_size: int | None = field(default=None, metadata={"help": "examples in the mix (default: the most no source "
                                 "has to repeat for)"})
    max_len: int = field(default=512, metadata={"help": "max tokens per example; longer dialogues lose their oldest "
                         "exchanges"})
    micro_batch_size: int = field(default=4, metadata={"help": "examples per forward pass"})
    global_batch_size: int = field(default=16, metadata={"help": "examples per optimizer step (accumulation fills it)"})
    max_steps: int = field(default=100, metadata={"help": "optimizer steps"})
    learning_rate: float | None = field(default=None, metadata={"help": "peak learning rate (default: 2e-5 full, 1e-4 "
                                        "LoRA at batch 32, scaled by sqrt(batch/32); `lmforge plan` shows it)"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "share of steps of linear warmup (then cosine)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm"})
    lora: bool = field(default=False, metadata={"help": "train a LoRA adapter instead of all weights"})
    qlora: bool = field(default=False, metadata={"help": "LoRA on a 4-bit NF4 base (bitsandbytes; implies --lora)"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scale numerator (scale = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS),
                                           metadata={"help": "module names that get adapters"})
    eval_every: int = field(default=50, metadata={"help": "evaluate on the held-out split every N steps (0: at the end)"})
    save_every: int = field(default=50, metadata={"help": "resumable checkpoint every N steps (0: at the end)"})
    keep_last: int = field(default=2, metadata={"help": "resumable checkpoints kept"})
    stop_at_step: int | None = field(default=None, metadata={"help": "checkpoint and exit at this step; rerun "
                                     "without it to continue"})
    seed: int = field(default=0, metadata={"help": "seed for the mix, the data order and new weights"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        if self.qlora:
            self.lora = True
        for name in ("max_len", "micro_batch_size", "global_batch_size", "max_steps", "lora_r", "lora_alpha",
                     "keep_last"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)!r}")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"--global-batch-size {self.global_batch_size} is not a multiple of "
                              f"--micro-batch-size {self.micro_batch_size}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ConfigError(f"--learning-rate must be positive, got {self.learning_rate}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.lora_dropout < 1:
            raise ConfigError("--warmup-ratio and --lora-dropout must be in [0, 1)")
        for name in ("eval_every", "save_every", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0")
        if self.stop_at_step is not None and not 0 < self.stop_at_step <= self.max_steps:
            raise ConfigError(f"--stop-at-step must be in (0, --max-steps], got {self.stop_at_step}")
        if self.mix_size is not None and self.mix_size <= 0:
            raise ConfigError(f"--mix-size must be positive, got {self.mix_size}")
        if not self.data:
            raise ConfigError("--data: no training data given (e.g. --data train.jsonl or a:0.3,b:0.7)")
        if not self.init_from:
            raise ConfigError("--init-from: the checkpoint to fine-tune is required (e.g. runs/small/final)")
        from lifecycle.checkpoint import check_output_dir

        check_output_dir(self.output_dir, self.init_from)

    @property
    def lr(self) -> float:
        from lifecycle.plan import default_finetune_lr

        return self.learning_rate or default_finetune_lr(is_lora=self.lora, global_batch_size=self.global_batch_size)

    def schedule_key(self) -> dict[str, Any]:
        """Settings a resumed run must share with the run it continues (they shape the curve)."""
        skip = {"output_dir", "stop_at_step", "progress", "eval_every", "save_every", "keep_last", "strict"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


# ------------------------------------------------------------------------------------------ data


@dataclass
class Mixed:
    """Training and held-out examples after mixing, with the manifest that describes them."""

    train: list[Any]
    eval: list[Any]
    manifest: Any  # DatasetManifest
    manifest_path: Path


def is_heldout(key: str, fraction: float) -> bool:
    if fraction <= 0:
        return False
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64 < fraction


def mix_sources(cfg: FinetuneConfig, read: Callable[..., list[Any]], encode: Callable[[Any], Any | None],
                num_tokens: Callable[[Any], int], key_of: Callable[[Any], str], out: Path,
                extra: dict[str, Any]) -> Mixed:
    """Read every source with `read(paths, fmt=, columns=, stats=, strict=)`, hold out, encode and mix.

    `encode(example)` returns the tokenized example or None when it cannot be used (too long: counted under
    "too long for --max-len"). The manifest records per source: weight, examples read, skipped, used and
    tokens used; it is written to `out/dataset_manifest.json`.
    """
    from lifecycle.data.formats import parse_column_map
    from lifecycle.data.manifest import DatasetManifest, sources_from_stats
    from lifecycle.data.mixing import parse_sources, plan_mix
    from lifecycle.data.readers import ReadStats

    columns = parse_column_map(cfg.columns)
    stats = ReadStats()
    sources = parse_sources(cfg.data)
    per_source: list[list[Any]] = []
    heldout: list[Any] = []
    too_long: dict[str, int] = {}
    for source in sources:
        kept = []
        for example in read([source.path], fmt=cfg.format, columns=columns, stats=stats, strict=cfg.strict):
            if not cfg.eval_data and is_heldout(key_of(example), cfg.eval_fraction):
                heldout.append(example)
                continue
            encoded = encode(example)
            if encoded is None:
                too_long[source.path] = too_long.get(source.path, 0) + 1
                continue
            kept.append(encoded)
        if not kept:
            n_long = too_long.get(source.path, 0)
            hint = f"; {n_long} longer than --max-len {cfg.max_len} (raise it)" if n_long else ""
            raise DataError(f"{source.path}: no usable examples{hint} ({stats.summary()})")
        per_source.append(kept)
    if cfg.eval_data:
        heldout = read(cfg.eval_data, fmt=cfg.format, columns=columns, stats=stats, strict=cfg.strict)
    eval_encoded = [e for e in (encode(x) for x in heldout) if e is not None]
    order = plan_mix([len(s) for s in per_source], [s.weight for s in sources], seed=cfg.seed, total=cfg.mix_size)
    train = [per_source[s][i] for s, i in order]
    used = [0] * len(sources)
    tokens = [0] * len(sources)
    for s, i in order:
        used[s] += 1
        tokens[s] += num_tokens(per_source[s][i])
    removed: dict[str, int] = {}
    for file_stats in stats.files.values():
        for reason, count in file_stats.skip_reasons.items():
            removed[reason] = removed.get(reason, 0) + count
    if too_long:
        removed["too long for --max-len"] = sum(too_long.values())
    mix = [{"source": s.path, "weight": round(s.weight, 6), "examples_available": len(per_source[k]),
            "examples_used": used[k], "tokens_used": tokens[k], "too_long": too_long.get(s.path, 0)}
           for k, s in enumerate(sources)]
    manifest = DatasetManifest(
        sources=sources_from_stats(stats), num_documents=stats.num_documents, num_tokens=sum(tokens),
        removed=removed,
        extra={"mix": mix, "train_examples": len(train), "eval_examples": len(eval_encoded),
               "eval_tokens": sum(num_tokens(e) for e in eval_encoded),
               "heldout": "files" if cfg.eval_data else f"fraction {cfg.eval_fraction}",
               "bad_records": stats.num_skipped, "first_problems": stats.examples, "max_len": cfg.max_len,
               "seed": cfg.seed, **extra})
    out.mkdir(parents=True, exist_ok=True)
    manifest.save(out / "dataset_manifest.json")
    if stats.num_skipped:
        print(f"data: {stats.summary()}", flush=True)
    return Mixed(train, eval_encoded, manifest, out / "dataset_manifest.json")


# ----------------------------------------------------------------------------------------- model


def load_base(cfg: FinetuneConfig, parent, *, auto_class: str = "AutoModelForCausalLM", **kwargs: Any):
    """The parent checkpoint in fp32, or in 4-bit NF4 (bitsandbytes) for QLoRA; LoRA wrapped by peft."""
    import torch
    import transformers

    cls = getattr(transformers, auto_class)
    load_kwargs: dict[str, Any] = {"dtype": torch.float32, "use_safetensors": True, "trust_remote_code": False}
    if cfg.qlora:
        load_kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_use_double_quant=True)
        load_kwargs["device_map"] = "cpu" if not torch.cuda.is_available() else None
    torch.manual_seed(cfg.seed)  # a new head (reward) and LoRA's A matrices start from the run's seed
    model = cls.from_pretrained(parent.path, **load_kwargs, **kwargs)
    # Without a KV cache transformers reads packed sequences from the position ids (no cross-example attention).
    model.config.use_cache = False
    if not cfg.lora:
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if missing := [m for m in cfg.lora_target_modules if m not in names]:
        raise ConfigError(f"--lora-target-modules: the model has no module named {', '.join(missing)}; "
                          f"linear layers are named e.g. {', '.join(DEFAULT_LORA_TARGETS)}")
    task = "SEQ_CLS" if auto_class == "AutoModelForSequenceClassification" else "CAUSAL_LM"
    return get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                            target_modules=list(cfg.lora_target_modules), task_type=task))


def trainer_arguments(cfg: FinetuneConfig, config_cls: type, out: Path, num_eval: int, **extra: Any):
    """A TRL config (SFTConfig / RewardConfig / DPOConfig) carrying our defaults."""
    import torch

    eval_every = cfg.eval_every or cfg.max_steps
    return config_cls(
        output_dir=str(out / TRAINER_DIR), use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False,
        per_device_train_batch_size=cfg.micro_batch_size, per_device_eval_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.global_batch_size // cfg.micro_batch_size, max_steps=cfg.max_steps,
        learning_rate=cfg.lr, lr_scheduler_type="cosine", warmup_steps=math.ceil(cfg.warmup_ratio * cfg.max_steps),
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.grad_clip, logging_steps=1, logging_first_step=True,
        eval_strategy="steps" if num_eval else "no", eval_steps=eval_every,
        save_strategy="steps", save_steps=cfg.save_every or cfg.max_steps, save_total_limit=cfg.keep_last,
        seed=cfg.seed, data_seed=cfg.seed, report_to=[], disable_tqdm=not cfg.progress,
        dataloader_num_workers=0, remove_unused_columns=False,
        # transformers' default logs the mean of earlier losses in place of a NaN one: the guard must see it.
        logging_nan_inf_filter=False, **extra)


def resume_point(cfg: FinetuneConfig, out: Path) -> str | None:
    """The trainer checkpoint to resume from, after checking the run's settings did not change."""
    key_path = out / "run_config.json"
    key = json.loads(json.dumps(cfg.schedule_key()))
    checkpoints = sorted((out / TRAINER_DIR).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])) \
        if (out / TRAINER_DIR).is_dir() else []
    if checkpoints and key_path.is_file():
        saved = json.loads(key_path.read_text())
        changed = sorted(k for k in key if saved.get(k) != key[k])
        if changed:
            raise ConfigError(f"{out} holds a run with different settings ({', '.join(changed)}); use another "
                              "--output-dir or the same settings to resume")
    from lifecycle.data.manifest import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(key_path, json.dumps(key, indent=1) + "\n")
    complete = [p for p in checkpoints if (p / "trainer_state.json").is_file()]
    return str(complete[-1]) if complete else None


# ------------------------------------------------------------------------------------- callbacks


def run_callback(cfg: FinetuneConfig, out: Path, watch: Sequence[str]):
    """metrics.jsonl per logged step, the NaN guard on `watch` keys, and --stop-at-step."""
    from transformers import TrainerCallback

    metrics_path = out / "metrics.jsonl"

    class RunCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if metrics_path.is_file():  # on resume: drop lines past the checkpoint we continue from
                lines = [ln for ln in metrics_path.read_text().splitlines()
                         if ln.strip() and json.loads(ln)["step"] <= state.global_step]
                tmp = metrics_path.with_suffix(".tmp")
                tmp.write_text("".join(ln + "\n" for ln in lines))
                os.replace(tmp, metrics_path)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            for key in watch:
                value = logs.get(key)
                if value is not None and not math.isfinite(float(value)):
                    last = latest_trainer_checkpoint(out)
                    raise NonFiniteLoss(f"{key} became {value} at step {state.global_step}; training stopped "
                                        f"before saving it. Last good checkpoint: {last or '(none yet)'}; lower "
                                        "--learning-rate or check the data, then rerun to resume from it")
            if state.is_world_process_zero and "total_flos" not in logs:
                record = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")

        def on_step_end(self, args, state, control, **kwargs):
            if cfg.stop_at_step is not None and state.global_step >= cfg.stop_at_step:
                control.should_save = True
                control.should_training_stop = True

    return RunCallback()


class NonFiniteLoss(LmforgeError):
    """The loss (or gradient norm) became NaN/inf; the run stopped before checkpointing it."""


def latest_trainer_checkpoint(out: Path) -> Path | None:
    root = out / TRAINER_DIR
    done = [p for p in root.glob("checkpoint-*") if (p / "trainer_state.json").is_file()] if root.is_dir() else []
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


# ----------------------------------------------------------------------------------------- finish


def finish(trainer, cfg: FinetuneConfig, *, recipe: str, parent, mixed: Mixed, out: Path, tokenizer,
           plot_keys: Sequence[str], extra: dict[str, Any] | None = None) -> Path:
    """Evaluate, write `out/final` (a checkpoint, or a LoRA adapter with the same manifest), plot the curves."""
    from lifecycle.checkpoint import save_checkpoint
    from lifecycle.export import save_adapter
    from lifecycle.plots import plot_metrics

    final = out / "final"
    metrics = {"steps": trainer.state.global_step}
    if mixed.eval:
        metrics |= {k: v for k, v in trainer.evaluate().items() if isinstance(v, (int, float))}
    common = dict(recipe=recipe, recipe_config=dataclasses.asdict(cfg), parent=parent,
                  dataset_manifest_hash=mixed.manifest.content_hash(), metrics=metrics,
                  extra={"dataset_manifest": mixed.manifest.to_dict(), "schedule_key": cfg.schedule_key(),
                         "learning_rate": cfg.lr, **(extra or {})})
    model = trainer.model
    if cfg.lora:
        save_adapter(final, model, tokenizer, **common)
    else:
        model.config.use_cache = True
        save_checkpoint(final, model, tokenizer, overwrite=True, **common)
    metrics_path = out / "metrics.jsonl"
    if metrics_path.is_file():
        plot_metrics(metrics_path, out / "curves.png", keys=plot_keys, title=f"{recipe} {out.name}")
    print(f"final {'adapter' if cfg.lora else 'checkpoint'}: {final}", flush=True)
    return final


def add_finetune_command(sub: Any, name: str, cls: type, run: Callable[[Any], Any], *, help: str, description: str,
                         example: str):
    from lifecycle.cli import add_subcommand
    from lifecycle.config import add_config_arguments

    parser = add_subcommand(sub, name, help=help, description=description, example=example)
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of the options below (flags override it)")
    add_config_arguments(parser, cls)

    def _run(args: Any) -> int:
        from lifecycle.config import config_from_args

        run(config_from_args(cls, args))
        return 0

    parser.set_defaults(func=_run)
    return parser
