"""Supervised fine-tuning on TRL's SFTTrainer, with our data handling (lifecycle/recipes/posttrain.py).

Examples are tokenized here with the tokenizer's chat template and given to SFTTrainer with their
`labels` already masked (lifecycle/data/chat_encoding.py decides, and tests check, which positions carry
loss): TRL then only batches, packs and optimizes. Packing (`--packing`) concatenates examples into
`--max-len` rows with position ids restarting per example and no attention mask; transformers builds a
block-diagonal causal mask from such position ids (masking_utils.find_packed_sequence_indices) for the
sdpa/eager/flash kernels, so no example attends to another (tests/lifecycle/test_sft.py checks the losses
against unpacked ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lifecycle.errors import ConfigError
from lifecycle.recipes.posttrain import FinetuneConfig, add_finetune_command


@dataclass
class SFTRecipeConfig(FinetuneConfig):
    output_dir: str = field(default="runs/sft", metadata={"help": "run directory"})
    train_on_history: bool = field(default=False, metadata={"help": "also train on the earlier assistant answers of "
                                   "a dialogue (default: only the last answer carries loss)"})
    packing: bool = field(default=False, metadata={"help": "pack examples into --max-len rows (no attention across "
                          "examples)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.format is not None and self.format not in ("alpaca", "messages", "sharegpt"):
            raise ConfigError(f"--format {self.format!r}: SFT data is alpaca, messages or sharegpt")


def encode_sft(tokenizer, conversation, cfg: SFTRecipeConfig) -> dict[str, Any] | None:
    """{"input_ids", "labels"} of one conversation, or None when its last exchange exceeds --max-len."""
    from lifecycle.data.chat_encoding import encode_conversation
    from lifecycle.data.formats import BadRecord

    try:
        enc = encode_conversation(tokenizer, conversation.messages, max_len=cfg.max_len,
                                  train_on_history=cfg.train_on_history)
    except BadRecord:
        return None
    labels = [t if m else -100 for t, m in zip(enc.input_ids, enc.assistant_masks)]
    return {"input_ids": enc.input_ids, "labels": labels}


def sft(cfg: SFTRecipeConfig) -> Path:
    """Run (or resume) SFT; returns out/final (a checkpoint, or an adapter with --lora)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from lifecycle.checkpoint import load_checkpoint
    from lifecycle.data.formats import read_conversations
    from lifecycle.recipes.posttrain import (finish, load_base, mix_sources, resume_point, run_callback,
                                             trainer_arguments)
    from lifecycle.tokenizer import tokenizer_hash

    out = Path(cfg.output_dir)
    parent = load_checkpoint(cfg.init_from)
    tokenizer = parent.load_tokenizer()
    mixed = mix_sources(cfg, read_conversations, lambda c: encode_sft(tokenizer, c, cfg),
                        lambda e: len(e["input_ids"]), lambda c: repr(c.messages), out,
                        extra={"stage": "sft", "tokenizer": tokenizer_hash(parent.path),
                               "train_on_history": cfg.train_on_history})
    resume = resume_point(cfg, out)
    model = load_base(cfg, parent)
    args = trainer_arguments(cfg, SFTConfig, out, len(mixed.eval), max_length=cfg.max_len, packing=cfg.packing,
                             packing_strategy="bfd", shuffle_dataset=False, dataset_num_proc=None)
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(mixed.train),
                         eval_dataset=Dataset.from_list(mixed.eval) if mixed.eval else None,
                         callbacks=[run_callback(cfg, out, watch=("loss", "grad_norm", "eval_loss"))])
    trainer.train(resume_from_checkpoint=resume)
    if cfg.stop_at_step is not None and cfg.stop_at_step < cfg.max_steps:
        print(f"stopped at step {cfg.stop_at_step} of {cfg.max_steps}; rerun without --stop-at-step to continue")
        return out / "trainer"
    return finish(trainer, cfg, recipe="sft", parent=parent, mixed=mixed, out=out, tokenizer=tokenizer,
                  plot_keys=("loss", "grad_norm", "mean_token_accuracy"))


def add_command(sub: Any) -> None:
    add_finetune_command(
        sub, "sft", SFTRecipeConfig, sft,
        help="supervised fine-tuning (full, LoRA or QLoRA) on instruction or chat data",
        description=("Supervised fine-tuning on TRL's SFTTrainer. Data: alpaca, messages or sharegpt records in "
                     "jsonl/json/csv/parquet, detected per file (--format forces one, --columns maps field names), "
                     "several sources mixed by weight. Loss only on the last assistant answer (--train-on-history "
                     "for all); long dialogues lose their oldest exchanges. Held-out eval, resumable checkpoints "
                     "(rerun the same command), metrics.jsonl and curves.png in --output-dir."),
        example="lmforge sft --init-from runs/small/final --data domain.jsonl:0.3,general.jsonl:0.7 --lora "
                "--max-steps 200 --output-dir runs/sft")
