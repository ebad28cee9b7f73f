"""Direct preference optimization on TRL's DPOTrainer, against a frozen reference.

The loss is TRL's (`--loss-type sigmoid` is DPO, Rafailov et al. 2023 eq. 7; `ipo`, `hinge`, `robust`, ...
as TRL exposes them). What this recipe adds:

- the reference (the --init-from checkpoint, normally the SFT model, unless --ref-model names another) is
  run once over the data before training and its log-probabilities are cached on disk next to the run
  (`ref_logps/<split>-<key>.safetensors`, the key hashing the reference checkpoint's manifest, the encoded
  data and the loss settings); the pass saves partial progress every few batches, so a killed run
  continues the pass, and a resumed or repeated run reads the file instead of loading the reference;
- a NaN/inf loss or gradient norm stops the run with the last good checkpoint named (posttrain.run_callback);
- chosen/rejected rewards, their margin and accuracy are in metrics.jsonl and curves.png.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from lifecycle.errors import ConfigError
from lifecycle.recipes.posttrain import FinetuneConfig, add_finetune_command

# Every loss TRL 1.16's DPOTrainer implements (trl/trainer/dpo_trainer.py, `_compute_loss`); a test compares this
# list with TRL's source, so a TRL upgrade that adds or drops one fails there rather than at step 1 of a run.
LossType = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                   "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
REF_CHUNK_BATCHES = 8  # partial reference log-probs are saved every this many batches


@dataclass
class DPORecipeConfig(FinetuneConfig):
    output_dir: str = field(default="runs/dpo", metadata={"help": "run directory"})
    ref_model: str | None = field(default=None, metadata={"help": "frozen reference checkpoint (default: --init-from)"})
    beta: float = field(default=0.1, metadata={"help": "strength of the KL penalty to the reference (DPO beta; "
                        "IPO's tau)"})
    loss_type: LossType = field(default="sigmoid", metadata={"help": "sigmoid = DPO (Rafailov et al. 2023); ipo, "
                                "hinge, robust, exo_pair, nca_pair, bco_pair, sppo_hard, aot, apo_zero, ... (TRL's)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "conservative/robust DPO label noise in [0, 0.5) "
                                   "(exo_pair needs > 0; its paper uses 1e-3)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.format is not None and self.format not in ("pairwise", "ranked"):
            raise ConfigError(f"--format {self.format!r}: preference data is pairwise or ranked")
        if not self.beta > 0:
            raise ConfigError(f"--beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"--loss-type {self.loss_type!r}: TRL's DPOTrainer offers {', '.join(LOSS_TYPES)}")
        if self.loss_type == "exo_pair" and self.label_smoothing == 0:
            raise ConfigError("--loss-type exo_pair needs --label-smoothing > 0 (the EXO paper uses 1e-3)")


def encode_dpo(tokenizer, pair, cfg: DPORecipeConfig) -> dict[str, Any] | None:
    from lifecycle.data.chat_encoding import encode_preference
    from lifecycle.data.formats import BadRecord

    try:
        enc = encode_preference(tokenizer, pair.prompt, pair.chosen, pair.rejected, max_len=cfg.max_len)
    except BadRecord:
        return None
    return {"prompt_ids": enc.prompt_ids, "chosen_ids": enc.chosen_ids, "rejected_ids": enc.rejected_ids}


def _data_key(rows: list[dict[str, Any]]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]]).encode())
    return digest.hexdigest()


def cached_ref_trainer(cache_dir: Path, ref_key: str):
    """DPOTrainer whose reference pass goes through an on-disk, resumable cache.

    TRL computes reference log-probs in `_precompute_ref_logps` (with `precompute_ref_log_probs=True`) and
    caches them in the datasets cache only for file-backed datasets; here the same per-batch computation
    (TRL's `compute_ref_log_probs`) is kept and only where the results live changes.
    """
    import torch
    from safetensors.torch import load_file, save_file
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from trl import DPOTrainer

    class CachedRefDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # Ours is tokenized already (encode_dpo), with prompts left-truncated by whole exchanges so every
            # example fits --max-len; TRL's preparation would re-tokenize from text.
            if "prompt_ids" in dataset.column_names:
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
            rows = [dataset[i] for i in range(len(dataset))]
            key = hashlib.sha256(f"{ref_key}:{_data_key(rows)}:{batch_size}".encode()).hexdigest()[:16]
            final = cache_dir / f"{name}-{key}.safetensors"
            partial = cache_dir / f"{name}-{key}.partial.safetensors"
            cache_dir.mkdir(parents=True, exist_ok=True)
            if final.is_file():
                tensors = load_file(str(final))
                print(f"reference log-probs for {name}: cached in {final}", flush=True)
            else:
                done = load_file(str(partial)) if partial.is_file() else {"chosen": torch.zeros(0),
                                                                            "rejected": torch.zeros(0)}
                chosen, rejected = [done["chosen"]], [done["rejected"]]
                start_batch = len(done["chosen"]) // batch_size
                loader = DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False)
                model = self.ref_model or self.model
                bar = tqdm(total=len(loader), initial=start_batch, desc=f"reference log-probs ({name})",
                           disable=bool(self.args.disable_tqdm))
                for index, batch in enumerate(loader):
                    if index < start_batch:
                        continue
                    batch = {k: v.to(self.accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    ref_chosen, ref_rejected = self.compute_ref_log_probs(model, batch)  # (batch,), (batch,)
                    chosen.append(ref_chosen.detach().float().cpu())
                    rejected.append(ref_rejected.detach().float().cpu())
                    bar.update(1)
                    if (index + 1) % REF_CHUNK_BATCHES == 0:
                        _atomic_save({"chosen": torch.cat(chosen), "rejected": torch.cat(rejected)}, partial)
                bar.close()
                tensors = {"chosen": torch.cat(chosen), "rejected": torch.cat(rejected)}
                _atomic_save(tensors, final)
                partial.unlink(missing_ok=True)
            if len(tensors["chosen"]) != len(dataset):
                raise RuntimeError(f"{final}: {len(tensors['chosen'])} cached rows for {len(dataset)} examples")
            dataset = dataset.add_column("ref_chosen_logps", tensors["chosen"].tolist())
            return dataset.add_column("ref_rejected_logps", tensors["rejected"].tolist())

    def _atomic_save(tensors: dict[str, Any], path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)

    return CachedRefDPOTrainer


def dpo(cfg: DPORecipeConfig) -> Path:
    from datasets import Dataset
    from trl import DPOConfig

    from lifecycle.checkpoint import load_checkpoint
    from lifecycle.data.formats import read_preferences
    from lifecycle.recipes.posttrain import (finish, load_base, mix_sources, resume_point, run_callback,
                                             trainer_arguments)
    from lifecycle.recipes.reward import pair_key
    from lifecycle.tokenizer import tokenizer_hash

    out = Path(cfg.output_dir)
    parent = load_checkpoint(cfg.init_from)
    ref = load_checkpoint(cfg.ref_model) if cfg.ref_model else parent
    tokenizer = parent.load_tokenizer()
    mixed = mix_sources(cfg, read_preferences, lambda p: encode_dpo(tokenizer, p, cfg),
                        lambda e: len(e["prompt_ids"]) * 2 + len(e["chosen_ids"]) + len(e["rejected_ids"]),
                        pair_key, out, extra={"stage": "dpo", "tokenizer": tokenizer_hash(parent.path)})
    resume = resume_point(cfg, out)
    model = load_base(cfg, parent)
    ref_model = None
    if cfg.ref_model:
        import torch

        ref_model = ref.load_model(dtype=torch.float32).eval()
    args = trainer_arguments(cfg, DPOConfig, out, len(mixed.eval), max_length=cfg.max_len, beta=cfg.beta,
                             loss_type=[cfg.loss_type], label_smoothing=cfg.label_smoothing,
                             precompute_ref_log_probs=True, precompute_ref_batch_size=cfg.micro_batch_size)
    ref_key = f"{ref.path.resolve()}:{ref.manifest_sha256()}:{cfg.max_len}"
    trainer_cls = cached_ref_trainer(out / "ref_logps", ref_key)
    trainer = trainer_cls(model=model, ref_model=ref_model, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_list(mixed.train),
                          eval_dataset=Dataset.from_list(mixed.eval) if mixed.eval else None,
                          callbacks=[run_callback(cfg, out, watch=("loss", "grad_norm", "eval_loss"))])
    trainer.train(resume_from_checkpoint=resume)
    if cfg.stop_at_step is not None and cfg.stop_at_step < cfg.max_steps:
        print(f"stopped at step {cfg.stop_at_step} of {cfg.max_steps}; rerun without --stop-at-step to continue")
        return out / "trainer"
    return finish(trainer, cfg, recipe="dpo", parent=parent, mixed=mixed, out=out, tokenizer=tokenizer,
                  plot_keys=("loss", "rewards/margins", "rewards/accuracies"),
                  extra={"reference": ref.reference(), "beta": cfg.beta, "loss_type": cfg.loss_type})


def add_command(sub: Any) -> None:
    add_finetune_command(
        sub, "dpo", DPORecipeConfig, dpo,
        help="direct preference optimization against a frozen reference (cached reference log-probs)",
        description=("DPO on TRL's DPOTrainer (--loss-type sigmoid; ipo, hinge, robust, ... as TRL has them) against "
                     "the --init-from checkpoint as the frozen reference (or --ref-model). Reference log-probs are "
                     "computed once and cached in --output-dir/ref_logps (resumable). Stops on a NaN loss naming the "
                     "last good checkpoint; logs chosen/rejected reward margins and accuracy."),
        example="lmforge dpo --init-from runs/sft/final --data prefs.jsonl --beta 0.1 --max-steps 200 "
                "--output-dir runs/dpo")
