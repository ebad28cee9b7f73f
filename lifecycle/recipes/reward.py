"""Reward model: the causal LM with a scalar head, trained on preference pairs with TRL's RewardTrainer.

The loss is the pairwise Bradley-Terry loss -log sigmoid(r(x, y_chosen) - r(x, y_rejected) - margin)
(Ouyang et al. 2022, eq. 1; the optional margin as in Llama 2, Touvron et al. 2023, eq. 2). The head reads
the last token's hidden state (LlamaForSequenceClassification with num_labels=1). Pairwise accuracy on the
held-out split is in metrics.jsonl (`eval_accuracy`) and the final manifest. `lmforge reward score` scores
(prompt, response) records from a file with a trained reward model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lifecycle.errors import ConfigError, DataError
from lifecycle.recipes.posttrain import FinetuneConfig, add_finetune_command


@dataclass
class RewardRecipeConfig(FinetuneConfig):
    output_dir: str = field(default="runs/reward", metadata={"help": "run directory"})
    margin: float = field(default=0.0, metadata={"help": "margin in the Bradley-Terry loss (chosen must beat "
                          "rejected by this much)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.format is not None and self.format not in ("pairwise", "ranked"):
            raise ConfigError(f"--format {self.format!r}: preference data is pairwise or ranked")
        if self.margin < 0:
            raise ConfigError(f"--margin must be >= 0, got {self.margin}")


def encode_reward(tokenizer, pair, cfg: RewardRecipeConfig) -> dict[str, Any] | None:
    from lifecycle.data.chat_encoding import encode_preference
    from lifecycle.data.formats import BadRecord

    try:
        enc = encode_preference(tokenizer, pair.prompt, pair.chosen, pair.rejected, max_len=cfg.max_len)
    except BadRecord:
        return None
    out = {"chosen_ids": enc.prompt_ids + enc.chosen_ids, "rejected_ids": enc.prompt_ids + enc.rejected_ids}
    if cfg.margin:
        out["margin"] = cfg.margin
    return out


def pair_key(pair) -> str:
    """Held-out split by prompt: the pairs a ranking expands to stay on one side."""
    return repr(pair.prompt)


def train_reward(cfg: RewardRecipeConfig) -> Path:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from lifecycle.checkpoint import load_checkpoint
    from lifecycle.data.formats import read_preferences
    from lifecycle.recipes.posttrain import (finish, load_base, mix_sources, resume_point, run_callback,
                                             trainer_arguments)
    from lifecycle.tokenizer import tokenizer_hash

    out = Path(cfg.output_dir)
    parent = load_checkpoint(cfg.init_from)
    tokenizer = parent.load_tokenizer()
    mixed = mix_sources(cfg, read_preferences, lambda p: encode_reward(tokenizer, p, cfg),
                        lambda e: len(e["chosen_ids"]) + len(e["rejected_ids"]), pair_key, out,
                        extra={"stage": "reward", "tokenizer": tokenizer_hash(parent.path)})
    resume = resume_point(cfg, out)
    model = load_base(cfg, parent, auto_class="AutoModelForSequenceClassification", num_labels=1,
                      pad_token_id=tokenizer.pad_token_id)
    args = trainer_arguments(cfg, RewardConfig, out, len(mixed.eval), max_length=cfg.max_len,
                             center_rewards_coefficient=None)
    trainer = RewardTrainer(model=model, args=args, processing_class=tokenizer,
                            train_dataset=Dataset.from_list(mixed.train),
                            eval_dataset=Dataset.from_list(mixed.eval) if mixed.eval else None,
                            callbacks=[run_callback(cfg, out, watch=("loss", "grad_norm", "eval_loss"))])
    trainer.train(resume_from_checkpoint=resume)
    if cfg.stop_at_step is not None and cfg.stop_at_step < cfg.max_steps:
        print(f"stopped at step {cfg.stop_at_step} of {cfg.max_steps}; rerun without --stop-at-step to continue")
        return out / "trainer"
    return finish(trainer, cfg, recipe="reward", parent=parent, mixed=mixed, out=out, tokenizer=tokenizer,
                  plot_keys=("loss", "accuracy", "margin"), extra={"head": "scalar (num_labels=1, last token)"})


# ------------------------------------------------------------------------------------------- score


def score_file(model_dir: str | Path, data: str | Path, *, batch_size: int = 8, max_len: int = 1024) -> list[dict]:
    """Reward of each (prompt, response) record: {prompt, response} or {messages} ending with the assistant."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from lifecycle.checkpoint import load_checkpoint
    from lifecycle.data.formats import BadRecord, Message, _messages_field, _text, iter_records
    from lifecycle.data.readers import ReadStats, expand_inputs

    ckpt = load_checkpoint(model_dir)
    tokenizer = ckpt.load_tokenizer()
    model = AutoModelForSequenceClassification.from_pretrained(ckpt.path, use_safetensors=True, dtype=torch.float32)
    if model.config.num_labels != 1:
        raise ConfigError(f"{model_dir}: not a reward model (num_labels={model.config.num_labels}, expected 1)")
    model.eval()
    rows: list[tuple[str, int, list[int]]] = []
    stats = ReadStats()
    for path in expand_inputs([data]):
        for line, record in iter_records(path, stats, strict=True):
            try:
                if not isinstance(record, dict):
                    raise BadRecord("not an object")
                if "messages" in record:
                    messages = _messages_field(record["messages"], "messages")
                else:
                    if "prompt" not in record or "response" not in record:
                        raise BadRecord(f'needs "prompt" and "response" (or "messages"); has {", ".join(record)}')
                    messages = [Message("user", _text(record["prompt"], '"prompt"')),
                                Message("assistant", _text(record["response"], '"response"'))]
            except BadRecord as err:
                raise DataError(f"{path}:{line}: {err}") from None
            ids = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                                tokenize=True, return_dict=True)["input_ids"]
            rows.append((str(path), line, list(ids)[-max_len:]))
    results = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = max(len(r[2]) for r in chunk)
            pad = tokenizer.pad_token_id
            ids = torch.tensor([r[2] + [pad] * (width - len(r[2])) for r in chunk])  # (batch, width), right-padded
            mask = torch.tensor([[1] * len(r[2]) + [0] * (width - len(r[2])) for r in chunk])
            scores = model(input_ids=ids, attention_mask=mask).logits[:, 0]  # (batch,)
            results += [{"source": s, "line": ln, "score": float(v)} for (s, ln, _), v in zip(chunk, scores)]
    return results


def add_command(sub: Any) -> None:
    """`lmforge reward [flags]` trains; `lmforge reward score` scores; `lmforge reward train` = the bare form.

    The training flags live on the `reward` parser itself; the actions are an optional positional, so
    argparse runs training when none is given (a subparser's defaults override its parent's `func`).
    """
    from lifecycle.cli import add_subcommand

    train_help = "train a reward model: the LM with a scalar head on preference pairs"
    train_description = ("Reward model on TRL's RewardTrainer: pairwise Bradley-Terry loss (optional --margin) on "
                         "pairwise or ranked preference data (rankings expand to all ordered pairs). Reports pairwise "
                         "accuracy on the held-out split. `lmforge reward score` scores responses with a trained one.")
    group = add_finetune_command(
        sub, "reward", RewardRecipeConfig, train_reward,
        help="train a reward model (Bradley-Terry); `lmforge reward score` scores responses with one",
        description=train_description,
        example="lmforge reward --init-from runs/sft/final --data prefs.jsonl --max-steps 200 --output-dir runs/reward")
    actions = group.add_subparsers(title="actions (optional; without one, train)", metavar="[train | score]",
                                   dest="reward_action")
    add_finetune_command(
        actions, "train", RewardRecipeConfig, train_reward, help=f"the same as bare `lmforge reward`: {train_help}",
        description=train_description,
        example="lmforge reward train --init-from runs/sft/final --data prefs.jsonl --max-steps 200 "
                "--output-dir runs/reward")
    score = add_subcommand(actions, "score", help="score (prompt, response) records with a reward model",
                           example="lmforge reward score --model runs/reward/final --data answers.jsonl")
    score.add_argument("--model", required=True, help="reward model checkpoint")
    score.add_argument("--data", required=True, help="jsonl/json/csv/parquet of {prompt, response} or {messages}")
    score.add_argument("--batch-size", type=int, default=8, help="records per forward pass")
    score.add_argument("--output", default=None, help="write the scores as jsonl here (default: stdout)")
    score.set_defaults(func=_run_score)


def _run_score(args: Any) -> int:
    if args.batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    results = score_file(args.model, args.data, batch_size=args.batch_size)
    text = "".join(json.dumps(r) + "\n" for r in results)
    if args.output:
        from lifecycle.data.manifest import atomic_write_text

        atomic_write_text(args.output, text)
        print(f"{len(results)} scores written to {args.output}")
    else:
        print(text, end="")
    return 0
