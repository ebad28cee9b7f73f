"""How well a speculative-decoding draft predicts its target, measured without timing.

The target continues held-out prompts greedily; both models then read those sequences (teacher
forcing) and we compare their next-token predictions at every generated position:

- `greedy_agreement`: how often the draft's argmax is the target's (the token the target emitted).
  Under greedy verification a draft token is accepted exactly when this holds, so with k drafts per
  step and independent positions the expected tokens per target step are (1 - a^(k+1)) / (1 - a)
  (Leviathan et al. 2023, eq. 1).
- `sampling_acceptance`: mean of sum_x min(p(x), q(x)) = 1 - TV(p, q) at temperature 1, the acceptance
  probability of speculative sampling (ibid., Sec. 3.3).
- `target_distinct_fraction`: distinct tokens / generated tokens of the target. A degenerate target
  that repeats one token makes every agreement number meaningless; this says so.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lifecycle.data.manifest import check_output_file
from lifecycle.errors import ConfigError


@dataclass(frozen=True)
class DraftAgreement:
    greedy_agreement: float
    sampling_acceptance: float
    target_distinct_fraction: float
    num_positions: int

    def expected_tokens_per_step(self, num_speculative_tokens: int) -> float:
        a, k = self.greedy_agreement, num_speculative_tokens
        return float(k + 1) if a >= 1 else (1 - a ** (k + 1)) / (1 - a)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def draft_agreement(target: torch.nn.Module, draft: torch.nn.Module, prompt_ids: torch.Tensor,
                    max_new_tokens: int = 96) -> DraftAgreement:
    """`prompt_ids` (num_prompts, prompt_len) all of one length (no padding); models are transformers
    causal LMs sharing a vocabulary. EOS does not stop the target: every row yields `max_new_tokens`."""
    target.eval()
    draft.eval()
    prompt_len = prompt_ids.shape[1]
    seqs = target.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                           max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)  # (n, prompt + new)
    # Position t predicts token t + 1: the predictions of the generated tokens start at prompt_len - 1.
    predicting = slice(prompt_len - 1, seqs.shape[1] - 1)
    p = torch.softmax(target(input_ids=seqs).logits[:, predicting].float(), dim=-1)  # (n, new, vocab)
    q = torch.softmax(draft(input_ids=seqs).logits[:, predicting].float(), dim=-1)  # (n, new, vocab)
    generated = seqs[:, prompt_len:]  # (n, new)
    return DraftAgreement(
        greedy_agreement=float((q.argmax(-1) == generated).float().mean()),
        sampling_acceptance=float(torch.minimum(p, q).sum(-1).mean()),
        target_distinct_fraction=len(torch.unique(generated)) / generated.numel(),
        num_positions=generated.numel())


# -------------------------------------------------------------------------------------------- CLI


@dataclass
class BenchDraftConfig:
    target: str | None = field(default=None, metadata={"help": "target checkpoint (default: the demo's, if built)"})
    draft: str | None = field(default=None, metadata={"help": "draft checkpoint (default: the demo's, if built)"})
    prompts: str | None = field(default=None, metadata={"help": "jsonl with a `text` field (default: the demo's held-out corpus)"})
    num_prompts: int = field(default=16, metadata={"help": "prompts (documents with at least --prompt-len tokens)"})
    prompt_len: int = field(default=32, metadata={"help": "tokens of each prompt"})
    max_new_tokens: int = field(default=96, metadata={"help": "greedy target tokens per prompt"})
    output: str = field(default="runs/bench/draft.json", metadata={"help": "JSON report"})

    def __post_init__(self) -> None:
        check_output_file(self.output)
        for name in ("num_prompts", "prompt_len", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


def bench_draft(cfg: BenchDraftConfig) -> dict[str, Any]:
    from lifecycle.checkpoint import load_checkpoint
    from lifecycle.data.manifest import atomic_write_text
    from lifecycle.data.readers import iter_documents
    from lifecycle.demo import DEFAULT_CACHE, DemoConfig

    demo = DEFAULT_CACHE / f"demo-{DemoConfig().key()}"
    paths = {"target": Path(cfg.target or demo / "target" / "final"), "draft": Path(cfg.draft or demo / "draft" / "final"),
             "prompts": Path(cfg.prompts or demo / "corpus" / "heldout.jsonl")}
    for name, path in paths.items():
        if not path.exists():
            raise ConfigError(f"--{name} {path} does not exist" + ("" if getattr(cfg, name) else "; run `lmforge demo`"))
    target, draft = load_checkpoint(paths["target"]), load_checkpoint(paths["draft"])
    tok = target.load_tokenizer()
    encoded = (tok.encode(d.text, add_special_tokens=False) for d in iter_documents([paths["prompts"]]))
    prompts = [ids[:cfg.prompt_len] for ids in encoded if len(ids) >= cfg.prompt_len][:cfg.num_prompts]
    if not prompts:
        raise ConfigError(f"--prompts {paths['prompts']}: no document has --prompt-len {cfg.prompt_len} tokens")
    result = draft_agreement(target.load_model(dtype=torch.float32), draft.load_model(dtype=torch.float32),
                             torch.tensor(prompts), cfg.max_new_tokens)
    report = {"benchmark": "draft", "target": str(paths["target"]), "draft": str(paths["draft"]),
              "num_prompts": len(prompts), "config": asdict(cfg), **result.to_dict(),
              "expected_tokens_per_step": {k: result.expected_tokens_per_step(k) for k in (2, 4, 8)}}
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(cfg.output), json.dumps(report, indent=2) + "\n")
    print(f"draft/target greedy agreement {result.greedy_agreement:.3f}, sampling acceptance "
          f"{result.sampling_acceptance:.3f}, target distinct-token fraction {result.target_distinct_fraction:.3f} "
          f"over {result.num_positions} positions; expected tokens/step at k=4: "
          f"{result.expected_tokens_per_step(4):.2f}  ({cfg.output})", flush=True)
    return report


def add_action(actions: Any) -> None:
    """`lmforge bench draft` (registered under the `bench` group of lifecycle/bench.py)."""
    from lifecycle.cli import add_subcommand
    from lifecycle.config import add_config_arguments

    parser = add_subcommand(
        actions, "draft", help="speculative draft quality: greedy agreement with its target, no timing",
        description=__doc__, example="lmforge bench draft --target runs/small/final --draft runs/draft/final")
    add_config_arguments(parser, BenchDraftConfig)
    parser.set_defaults(func=_run)


def _run(args: Any) -> int:
    from lifecycle.config import config_from_args

    bench_draft(config_from_args(BenchDraftConfig, args))
    return 0
