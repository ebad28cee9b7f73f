"""Causal-LM pretraining, from scratch or continued from a checkpoint.

A flat recipe on transformers (the model) and accelerate (devices, DDP under torchrun, mixed
precision). What it adds is the part people lose runs to:

- exact resume: the data order is a pure function of (seed, position in the stream), and model,
  optimizer, schedule and RNG states are checkpointed without pickle, so a killed run rerun with the
  same command continues the same loss curve (tests check equality);
- the same global batch at any world size: `global_batch_size` sequences per optimizer step, split
  into micro-batches across accumulation steps and ranks;
- atomic checkpoints with manifests (see lifecycle/checkpoint.py), a loss-curve PNG and metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lifecycle.checkpoint import Checkpoint, check_output_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from lifecycle.errors import ConfigError, DataError, LmforgeError
from lifecycle.plots import plot_loss_curve
from lifecycle.recipes.distill import Teacher
from lifecycle.train_state import STATE_DIR, load_train_state, save_train_state

Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class PretrainConfig:
    data: list[str] = field(default_factory=list, metadata={"help": "training text: .txt/.jsonl/.json/.parquet/.csv files or directories; with weights (domain.jsonl:0.1,general/:0.9) the sources are mixed by document share"})
    eval_data: list[str] = field(default_factory=list, metadata={"help": "held-out text; if empty, --eval-fraction of --data is held out"})
    text_field: str = field(default="text", metadata={"help": "field holding the text in jsonl/json/parquet/csv"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer directory (default: the --init-from checkpoint's)"})
    preset: str = field(default="small", metadata={"help": "model size for training from scratch: draft (2-layer speculative draft), tiny, small, base, 1b"})
    model_config: str | None = field(default=None, metadata={"help": "YAML/JSON of model fields overriding the preset"})
    init_from: str | None = field(default=None, metadata={"help": "checkpoint to continue pretraining from (ours or a plain HF Llama/Qwen2 dir)"})
    distill_from: str | None = field(default=None, metadata={"help": "frozen teacher checkpoint (same tokenizer): train on KL(teacher || student), e.g. to make a speculative-decoding draft of that target"})
    distill_temperature: float = field(default=1.0, metadata={"help": "softmax temperature of teacher and student in the distillation term"})
    distill_alpha: float = field(default=0.0, metadata={"help": "weight of the usual next-token cross-entropy; 1 - alpha weights the distillation term"})
    output_dir: str = field(default="runs/pretrain", metadata={"help": "run directory: checkpoints/, final/, metrics.jsonl, loss_curve.png"})
    seq_len: int = field(default=256, metadata={"help": "tokens per packed sequence"})
    micro_batch_size: int = field(default=8, metadata={"help": "sequences per forward pass per process"})
    global_batch_size: int = field(default=16, metadata={"help": "sequences per optimizer step over all processes and accumulation steps"})
    max_steps: int = field(default=200, metadata={"help": "optimizer steps"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate (AdamW)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine schedule floor as a fraction of the peak"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (not applied to norms and biases)"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0 disables)"})
    precision: Precision = field(default="auto", metadata={"help": "auto = bf16 on GPUs that support it, fp32 on CPU"})
    eval_every: int = field(default=50, metadata={"help": "evaluate every N steps (0: only at the end)"})
    eval_batches: int = field(default=16, metadata={"help": "max micro-batches per evaluation"})
    eval_fraction: float = field(default=0.02, metadata={"help": "share of documents held out when --eval-data is empty"})
    save_every: int = field(default=100, metadata={"help": "write a resumable checkpoint every N steps (0: only at the end)"})
    keep_last: int = field(default=2, metadata={"help": "resumable checkpoints kept"})
    stop_at_step: int | None = field(default=None, metadata={"help": "checkpoint and exit at this step (e.g. to fit a time slot); rerun without it to continue"})
    log_every: int = field(default=1, metadata={"help": "write a metrics line every N steps"})
    seed: int = field(default=0, metadata={"help": "seed for initialization and data order"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if value is None or value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value!r}")

        for name in ("seq_len", "micro_batch_size", "global_batch_size", "max_steps", "learning_rate",
                     "log_every", "eval_batches", "keep_last"):
            positive(name)
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"--global-batch-size {self.global_batch_size} is not a multiple of "
                              f"--micro-batch-size {self.micro_batch_size}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.warmup_steps >= self.max_steps:
            raise ConfigError(f"--warmup-steps must be in [0, --max-steps), got {self.warmup_steps}")
        for name in ("eval_every", "save_every", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0")
        if self.distill_temperature <= 0 or not 0 <= self.distill_alpha <= 1:
            raise ConfigError(f"--distill-temperature must be > 0 and --distill-alpha in [0, 1], got "
                              f"{self.distill_temperature} and {self.distill_alpha}")
        if self.stop_at_step is not None and not 0 < self.stop_at_step <= self.max_steps:
            raise ConfigError(f"--stop-at-step must be in (0, --max-steps], got {self.stop_at_step}")
        check_output_dir(self.output_dir, self.init_from)
        if not self.data:
            raise ConfigError("--data: no training data given")

    def schedule_key(self) -> dict[str, Any]:
        """Fields that must not change between a run and its resume (they shape the loss curve)."""
        keep = ("seq_len", "global_batch_size", "max_steps", "learning_rate", "min_lr_ratio", "warmup_steps",
                "weight_decay", "beta1", "beta2", "seed", "preset", "model_config", "init_from")
        if self.distill_from:  # only then, so runs from before distillation existed still resume
            keep += ("distill_from", "distill_temperature", "distill_alpha")
        return {k: getattr(self, k) for k in keep}


# ------------------------------------------------------------------------------------------- data


@dataclass
class PackedData:
    train: np.ndarray  # (num_blocks, seq_len) int32
    eval: np.ndarray  # (num_eval_blocks, seq_len) int32
    manifest_hash: str
    manifest: dict[str, Any]


def _doc_is_heldout(text: str, fraction: float) -> bool:
    """A stable hash of the text decides, so the split never depends on file order or RNG state."""
    if fraction <= 0:
        return False
    digest = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return digest / 2**64 < fraction


def prepare_data(cfg: PretrainConfig, tokenizer, tokenizer_id: str, cache_dir: Path) -> PackedData:
    """Read, split, tokenize and pack; cached in `cache_dir` keyed by input hashes + tokenizer + seq_len."""
    from lifecycle.data.manifest import DatasetManifest, sha256_file, sources_from_stats
    from lifecycle.data.packing import pack_blocks, tokenize_stream
    from lifecycle.data.readers import ReadStats, expand_inputs, iter_documents

    sources = weighted_sources(cfg.data)
    train_files = expand_inputs([s.path for s in sources] if sources else cfg.data)
    eval_files = expand_inputs(cfg.eval_data) if cfg.eval_data else []
    key = {
        "train": [(str(p), sha256_file(p)) for p in train_files],
        "eval": [(str(p), sha256_file(p)) for p in eval_files],
        "text_field": cfg.text_field, "tokenizer": tokenizer_id, "seq_len": cfg.seq_len,
        "eval_fraction": 0.0 if eval_files else cfg.eval_fraction,
    }
    if sources:  # only then: caches of unweighted runs keep their keys
        key |= {"mix": [(s.path, s.weight) for s in sources], "seed": cfg.seed}
    key_hash = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache = cache_dir / key_hash
    if (cache / "dataset_manifest.json").is_file():
        manifest = DatasetManifest.load(cache / "dataset_manifest.json")
        return PackedData(np.load(cache / "train.npy", allow_pickle=False), np.load(cache / "eval.npy", allow_pickle=False),
                          manifest.content_hash(), manifest.to_dict())

    stats = ReadStats()
    per_source: list[list[str]] = []
    eval_texts: list[str] = []
    for group in ([s.path] for s in sources) if sources else [train_files]:
        per_source.append([])
        for doc in iter_documents(group, text_field=cfg.text_field, stats=stats):
            heldout = not eval_files and _doc_is_heldout(doc.text, cfg.eval_fraction)
            (eval_texts if heldout else per_source[-1]).append(doc.text)
        if sources and not per_source[-1]:
            raise DataError(f"{group[0]}: no usable documents in this --data source ({stats.summary()})")
    if eval_files:
        eval_texts = [d.text for d in iter_documents(eval_files, text_field=cfg.text_field, stats=stats)]
    mix_extra: dict[str, Any] = {}
    if sources:  # documents drawn by weight, seeded (lifecycle/data/mixing.py); the realized token shares recorded
        from lifecycle.data.mixing import plan_mix

        order = plan_mix([len(t) for t in per_source], [s.weight for s in sources], seed=cfg.seed)
        train_texts = [per_source[k][i] for k, i in order]
    else:
        order, train_texts = [], per_source[0]
    if not train_texts:
        raise DataError(f"empty corpus: no usable documents in {', '.join(map(str, cfg.data))}")
    doc_lengths: list[int] = []
    train_stream, num_train_docs = tokenize_stream(train_texts, tokenizer, doc_lengths=doc_lengths)
    if sources:
        used, tokens = [0] * len(sources), [0] * len(sources)
        for (k, _), n in zip(order, doc_lengths):
            used[k], tokens[k] = used[k] + 1, tokens[k] + n
        mix_extra["mix"] = [{"source": s.path, "weight": round(s.weight, 6), "documents_available": len(per_source[k]),
                             "documents_used": used[k], "tokens_used": tokens[k],
                             "token_share": round(tokens[k] / max(sum(tokens), 1), 6)}
                            for k, s in enumerate(sources)]
    eval_stream, num_eval_docs = tokenize_stream(eval_texts, tokenizer)
    train = pack_blocks(train_stream, cfg.seq_len)
    evalb = pack_blocks(eval_stream, cfg.seq_len)
    if len(train) == 0:
        raise DataError(f"the training text is {len(train_stream)} tokens, shorter than one sequence of "
                        f"--seq-len {cfg.seq_len}; give more data or a smaller --seq-len")
    manifest = DatasetManifest(
        sources=sources_from_stats(stats), num_documents=num_train_docs + num_eval_docs,
        num_tokens=int(len(train_stream)), removed=_skip_counts(stats),
        extra={"tokenizer": tokenizer_id, "seq_len": cfg.seq_len,
               "tail_tokens_dropped": int(len(train_stream) - train.size), "train_blocks": int(len(train)),
               "eval_blocks": int(len(evalb)), "train_documents": num_train_docs, "eval_documents": num_eval_docs,
               "eval_tokens": int(len(eval_stream)), "heldout": "files" if eval_files else f"fraction {cfg.eval_fraction}",
               **mix_extra})
    tmp = cache.with_name(cache.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "train.npy", train)
    np.save(tmp / "eval.npy", evalb)
    manifest.save(tmp / "dataset_manifest.json")
    if not cache.exists():
        os.rename(tmp, cache)
    else:  # another rank got there first with identical content
        shutil.rmtree(tmp, ignore_errors=True)
    return PackedData(train, evalb, manifest.content_hash(), manifest.to_dict())


def weighted_sources(specs: list[str]) -> list:
    """`--data a.jsonl:0.2,b/:0.8` -> mixing.Sources; [] when no source carries a weight (plain files are read
    whole, in order, as before weights existed)."""
    from lifecycle.data.mixing import parse_sources

    def has_weight(item: str) -> bool:
        _, sep, tail = item.rpartition(":")
        try:
            return bool(sep) and float(tail) == float(tail)
        except ValueError:
            return False

    items = [part.strip() for spec in specs for part in spec.split(",") if part.strip()]
    return parse_sources(items) if any(has_weight(i) for i in items) else []


def _skip_counts(stats) -> dict[str, int]:
    """Documents skipped by the readers, per reason, over all files."""
    total: dict[str, int] = {}
    for file_stats in stats.files.values():
        for reason, count in file_stats.skip_reasons.items():
            total[reason] = total.get(reason, 0) + count
    return total


def block_indices(step: int, num_blocks: int, global_batch: int, seed: int) -> np.ndarray:
    """The `global_batch` block indices of optimizer step `step` (0-based).

    The stream of blocks is epoch after epoch of a permutation seeded by (seed, epoch): a pure
    function of the position, so resume and any world size see exactly the same batches.
    """
    positions = np.arange(step * global_batch, (step + 1) * global_batch)
    out = np.empty(global_batch, dtype=np.int64)
    for epoch in np.unique(positions // num_blocks):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(num_blocks)
        mask = positions // num_blocks == epoch
        out[mask] = perm[positions[mask] % num_blocks]
    return out


# ------------------------------------------------------------------------------------------ model


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def _build_model(cfg: PretrainConfig, tokenizer, parent: Checkpoint | None):
    from transformers import LlamaForCausalLM

    from lifecycle.presets import resolve_model_config

    if parent is not None:
        model = parent.load_model(dtype=torch.float32)
        if model.config.vocab_size < len(tokenizer):
            raise ConfigError(f"--tokenizer has {len(tokenizer)} tokens but {parent.path} has vocab_size "
                              f"{model.config.vocab_size}")
        return model
    model_cfg = resolve_model_config(cfg.preset, cfg.model_config, vocab_size=len(tokenizer))
    hf_config = model_cfg.to_hf(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
    if cfg.seq_len > model_cfg.max_position_embeddings:
        raise ConfigError(f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings "
                          f"{model_cfg.max_position_embeddings}")
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(hf_config)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No decay on norms and biases (1-D tensors), as in GPT-2/nanoGPT."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model, blocks: np.ndarray, micro_batch_size: int, max_batches: int, device, autocast) -> dict[str, float]:
    """Mean token loss and perplexity over up to `max_batches` micro-batches of held-out blocks."""
    if len(blocks) == 0:
        return {}
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, min(len(blocks), micro_batch_size * max_batches), micro_batch_size):
        ids = torch.from_numpy(blocks[start:start + micro_batch_size].astype(np.int64)).to(device)  # (b, seq)
        with autocast():
            loss = model(input_ids=ids, labels=ids).loss
        n = ids.numel() - ids.shape[0]  # labels are shifted: seq_len - 1 predictions per row
        total += float(loss) * n
        count += n
    model.train(was_training)
    mean = total / count
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0))}


# ------------------------------------------------------------------------------------------ train


def pretrain(cfg: PretrainConfig) -> Path:
    """Run (or resume) pretraining; returns the final checkpoint directory."""
    from accelerate import Accelerator
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    from lifecycle.tokenizer import load_tokenizer, tokenizer_hash

    out = Path(cfg.output_dir)
    parent = load_checkpoint(cfg.init_from) if cfg.init_from else None
    tok_dir = cfg.tokenizer or (str(parent.path) if parent else None)
    if tok_dir is None:
        raise ConfigError("--tokenizer is required when training from scratch (train one with "
                          "`lmforge tokenizer train`)")
    tokenizer = load_tokenizer(tok_dir)

    from accelerate import PartialState

    # accelerate runs multi-process CPU training (gloo) only when told `cpu=True`; on a GPU box the
    # same code takes CUDA (DDP over NCCL under torchrun).
    use_cpu = not torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not use_cpu and local_rank >= torch.cuda.device_count():
        # Otherwise CUDA's "invalid device ordinal" surfaces from deep inside accelerate.
        raise ConfigError(f"this process is local rank {local_rank} but only {torch.cuda.device_count()} GPU(s) "
                          f"are visible: start torchrun with --nproc_per_node {torch.cuda.device_count()}, or "
                          "set CUDA_VISIBLE_DEVICES= to train on CPU processes")
    precision = _resolve_precision(cfg.precision, PartialState(cpu=use_cpu).device)
    from accelerate.state import AcceleratorState

    if not torch.distributed.is_initialized():
        # AcceleratorState is a process-wide singleton that refuses a second precision; a Python
        # API user may well call pretrain() twice (fp32, then bf16) in one process.
        AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=use_cpu, mixed_precision="no" if precision == "fp32" else precision)
    world = accelerator.num_processes
    per_step = cfg.micro_batch_size * world
    if cfg.global_batch_size % per_step:
        raise ConfigError(f"--global-batch-size {cfg.global_batch_size} is not a multiple of "
                          f"--micro-batch-size x processes = {per_step}")
    accum = cfg.global_batch_size // per_step
    is_main = accelerator.is_main_process

    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    data = prepare_data(cfg, tokenizer, tokenizer_hash(tok_dir), out / "data") if is_main else None
    accelerator.wait_for_everyone()
    if data is None:  # other ranks read the cache rank 0 wrote
        data = prepare_data(cfg, tokenizer, tokenizer_hash(tok_dir), out / "data")

    resume_dir = latest_checkpoint(out)
    resume = load_checkpoint(resume_dir) if resume_dir is not None else None
    if resume is not None:
        saved_key = resume.manifest["extra"].get("schedule_key") or {}
        changed = sorted(k for k, v in cfg.schedule_key().items() if saved_key.get(k) != v)
        if changed:
            raise ConfigError(f"{out} holds a run with different settings ({', '.join(changed)}); use another "
                              "--output-dir or the same settings to resume")
        model = resume.load_model(dtype=torch.float32)
    else:
        model = _build_model(cfg, tokenizer, parent)
    model.config.use_cache = False
    teacher = Teacher.load(cfg.distill_from, tok_dir, model.config.vocab_size, cfg.distill_temperature,
                           cfg.distill_alpha, resumed=resume) if cfg.distill_from else None
    distilled = {"distilled_from": teacher.manifest_entry()} if teacher else {}  # goes into every manifest
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                                  betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps, min_lr_rate=cfg.min_lr_ratio)

    start_step, tokens_seen = 0, 0
    if resume is not None:
        counters = load_train_state(resume.path / STATE_DIR, optimizer=optimizer, scheduler=scheduler)
        start_step, tokens_seen = counters["step"], counters["tokens_seen"]
        if is_main:
            print(f"resuming {out} from step {start_step} ({resume.path.name})", flush=True)

    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    autocast = accelerator.autocast
    if teacher is not None:
        teacher.to(device)
    metrics_path = out / "metrics.jsonl"
    if is_main:
        _truncate_metrics(metrics_path, start_step)

    stop = cfg.stop_at_step or cfg.max_steps
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    bar = None
    if is_main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=start_step, desc="pretrain", unit="step", dynamic_ncols=True)
    model.train()
    t_last, tokens_last = time.perf_counter(), tokens_seen
    last_eval: dict[str, float] = {}
    for step in range(start_step, stop):
        idx = block_indices(step, len(data.train), cfg.global_batch_size, cfg.seed)
        step_loss = torch.zeros((), device=device)
        for micro in range(accum):
            lo = micro * per_step + accelerator.process_index * cfg.micro_batch_size
            rows = idx[lo:lo + cfg.micro_batch_size]
            ids = torch.from_numpy(data.train[rows].astype(np.int64)).to(device)  # (micro_batch, seq_len)
            sync = micro == accum - 1
            ctx = accelerator.no_sync(model) if not sync and world > 1 else contextlib.nullcontext()
            with ctx, autocast():
                fwd = model(input_ids=ids, labels=ids)
                loss = (fwd.loss if teacher is None else teacher.loss(fwd.logits, fwd.loss, ids)) / accum
                accelerator.backward(loss)
            step_loss += loss.detach()
        if cfg.grad_clip > 0:
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        else:
            grad_norm = float("nan")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:  # the logged loss is the global-batch mean, identical to a 1-process run's
            step_loss = accelerator.reduce(step_loss, reduction="mean")
        loss_value = float(step_loss)
        if not math.isfinite(loss_value):
            raise LmforgeError(f"loss became {loss_value} at step {step + 1}; lower --learning-rate or check the data. "
                            f"The last good checkpoint is {latest_checkpoint(out)}")
        tokens_seen += tokens_per_step
        done = step + 1
        record: dict[str, Any] = {}
        if cfg.eval_every and done % cfg.eval_every == 0 or done == cfg.max_steps:
            last_eval = evaluate(accelerator.unwrap_model(model), data.eval, cfg.micro_batch_size,
                                 cfg.eval_batches, device, autocast)
            record.update(last_eval)
        if is_main and (done % cfg.log_every == 0 or record or done == stop):
            now = time.perf_counter()
            tps = (tokens_seen - tokens_last) / max(now - t_last, 1e-9)
            t_last, tokens_last = now, tokens_seen
            record = {"step": done, "loss": loss_value, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                      "tokens": tokens_seen, "tokens_per_s": tps} | record
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if bar is not None:
            bar.update(1)
            elapsed = max(bar.format_dict["elapsed"], 1e-9)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                            tok_s=f"{(done - start_step) * tokens_per_step / elapsed:.0f}",
                            **({"eval": f"{last_eval['eval_loss']:.3f}"} if last_eval else {}))
        if (cfg.save_every and done % cfg.save_every == 0) or done == stop:
            _save_step(accelerator, model, optimizer, scheduler, tokenizer, cfg, data, parent, out, done,
                       tokens_seen, distilled)
    if bar is not None:
        bar.close()

    final = out / "final"
    if stop < cfg.max_steps:
        if is_main:
            print(f"stopped at step {stop} of {cfg.max_steps}; rerun the same command without --stop-at-step "
                  "to continue", flush=True)
        return latest_checkpoint(out)  # type: ignore[return-value]
    if is_main:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.config.use_cache = True
        metrics = {"steps": cfg.max_steps, "tokens_seen": tokens_seen} | last_eval
        save_checkpoint(final, unwrapped, tokenizer, recipe="pretrain", recipe_config=dataclasses.asdict(cfg),
                        parent=parent, dataset_manifest_hash=data.manifest_hash, metrics=metrics,
                        extra={"schedule_key": cfg.schedule_key(), "world_size": world, "precision": precision,
                               **distilled},
                        overwrite=True)
        plot_loss_curve(metrics_path, out / "loss_curve.png", title=f"pretrain {out.name}")
        print(f"final checkpoint: {final}", flush=True)
    accelerator.wait_for_everyone()
    return final


def _save_step(accelerator, model, optimizer, scheduler, tokenizer, cfg, data, parent, out: Path, step: int,
               tokens_seen: int, distilled: dict[str, Any]) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        target = out / "checkpoints" / f"step-{step:07d}"
        unwrapped = accelerator.unwrap_model(model)

        def write_state(tmp: Path) -> None:
            save_train_state(tmp / STATE_DIR, optimizer=optimizer, scheduler=scheduler,
                             counters={"step": step, "tokens_seen": tokens_seen})

        save_checkpoint(target, unwrapped, tokenizer, recipe="pretrain", recipe_config=dataclasses.asdict(cfg),
                        parent=parent, dataset_manifest_hash=data.manifest_hash,
                        metrics={"step": step, "tokens_seen": tokens_seen},
                        extra={"schedule_key": cfg.schedule_key(), "resumable": True, **distilled},
                        write_extra_files=write_state, overwrite=True)
        steps = sorted((p for p in (out / "checkpoints").iterdir() if p.name.startswith("step-")),
                       key=lambda p: p.name)
        for old in steps[:-cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint we resume from (they will be redone)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in lines))
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------- CLI


def add_command(sub: Any) -> None:
    from lifecycle.cli import add_subcommand
    from lifecycle.config import add_config_arguments

    parser = add_subcommand(
        sub, "pretrain", help="causal-LM pretraining from scratch or continued from a checkpoint",
        description=("Causal-LM pretraining with sequence packing, cosine schedule with warmup, gradient "
                     "accumulation, mixed precision where the device supports it, periodic evaluation, "
                     "resumable checkpoints (rerun the same command to continue) and a loss-curve PNG.\n"
                     "Multi-process: torchrun --nproc_per_node N -m lifecycle pretrain ... (same global batch)."),
        example="lmforge pretrain --data corpus.jsonl --tokenizer tok/ --preset small --max-steps 500 "
                "--output-dir runs/small")
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of the options below (flags override it)")
    add_config_arguments(parser, PretrainConfig)
    parser.set_defaults(func=_run)


def _run(args: Any) -> int:
    from lifecycle.config import config_from_args

    pretrain(config_from_args(PretrainConfig, args))
    return 0
