"""Training text for a speculative-decoding draft: its target's own greedy continuations.

A draft token is accepted under greedy verification exactly when it equals the target's argmax *in the
context the target itself produced*. Distilling on the corpus alone (lifecycle/recipes/distill.py)
teaches the draft the target's distribution on human text, which is not where the draft runs: at
serving time it reads the target's output. DistillSpec (Zhou et al. 2023, Sec. 4) finds that
distilling on model-generated data closes much of that gap; this module writes that data, and the
pretrain recipe then distils on a mix of it and the corpus (`--data corpus:0.5 continuations:0.5`).

Each record is a random window of a training document (the prompt, 8-64 tokens) followed by the target's
greedy continuation: `{"text": decoded, "token_ids": prompt + continuation, "prompt_tokens": n,
"target_manifest_sha256": ...}` (the recipes read `text`; the ids keep the exact tokens).
The continuations come from lmforge's own engine (continuous batching, all prompts at once), so a few
hundred of them cost well under a minute for the demo's `small` target.

Measured on the demo pair (docs/BENCHMARKS.md, "W3 draft quality"): greedy agreement 0.75 -> 0.90 on
held-out prompts with half of the draft's 240 steps on 256 continuations of 208 tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lifecycle.errors import ConfigError


def sample_prompts(token_docs: list[list[int]], num_prompts: int, *, min_len: int = 8, max_len: int = 64,
                   seed: int = 0) -> list[list[int]]:
    """`num_prompts` random windows of `min_len..max_len` tokens, each from a different document (documents
    shorter than `min_len` are skipped); fewer when the corpus has fewer usable documents."""
    if not 1 <= min_len <= max_len:
        raise ConfigError(f"prompt lengths: need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    rng = random.Random(seed)
    order = list(range(len(token_docs)))
    rng.shuffle(order)
    prompts = []
    for i in order:
        ids = token_docs[i]
        if len(ids) < min_len:
            continue
        length = rng.randint(min_len, min(max_len, len(ids)))
        start = rng.randint(0, len(ids) - length)
        prompts.append(ids[start:start + length])
        if len(prompts) == num_prompts:
            break
    return prompts


def write_target_continuations(target: str | Path, corpus_file: str | Path, out_file: str | Path, *,
                               num_prompts: int = 128, max_new_tokens: int = 192, seed: int = 0,
                               max_documents: int = 20_000) -> Path:
    """Greedy continuations of `target` on prompts cut from `corpus_file` (jsonl with `text`), written
    atomically to `out_file` (jsonl). Returns `out_file`."""
    from lifecycle.checkpoint import load_checkpoint
    from lifecycle.data.manifest import atomic_write_text, check_output_file
    from lifecycle.data.readers import iter_documents
    from serve.engine.llm_engine import EngineConfig, LLMEngine
    from serve.types import SamplingParams

    if num_prompts <= 0 or max_new_tokens <= 0:
        raise ConfigError(f"num_prompts and max_new_tokens must be positive, got {num_prompts}, {max_new_tokens}")
    check_output_file(out_file)  # now, not after generating every continuation
    ckpt = load_checkpoint(target)
    engine = LLMEngine(EngineConfig(model=str(target)))
    tok = engine.tokenizer
    room = engine.max_model_len - max_new_tokens  # prompt + continuation must fit the context
    if room < 8:
        raise ConfigError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the target's "
                          f"{engine.max_model_len}-token context")
    docs = []
    for doc in iter_documents([Path(corpus_file)]):
        # whole documents, longer than the context: prompts are cut from them, so no "sequence too long" warning
        docs.append(tok.encode(doc.text, add_special_tokens=False, verbose=False))
        if len(docs) >= max_documents:
            break
    prompts = sample_prompts(docs, num_prompts, max_len=min(64, room), seed=seed)
    if not prompts:
        raise ConfigError(f"{corpus_file}: no document has 8 tokens to cut a prompt from")
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    outputs = engine.generate(prompts, params)
    sha = ckpt.manifest_sha256()
    lines = []
    for prompt, out in zip(prompts, outputs):
        ids = list(prompt) + list(out.outputs[0].token_ids)
        lines.append(json.dumps({"text": tok.decode(ids), "prompt_tokens": len(prompt), "token_ids": ids,
                                 "target_manifest_sha256": sha}, ensure_ascii=False))
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


def continuations_target_sha(path: str | Path) -> str | None:
    """The target manifest sha256 a continuations file was generated from (None if unreadable)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.loads(f.readline()).get("target_manifest_sha256")
    except (OSError, ValueError, AttributeError):
        return None


# -------------------------------------------------------------------------------------------- CLI


def add_command(sub) -> None:
    """`lmforge draft-data`: the continuations file, for `lmforge pretrain --distill-from` with a weight."""
    from lifecycle.cli import add_subcommand

    parser = add_subcommand(
        sub, "draft-data", help="a target's greedy continuations of corpus prompts, to distil a speculative draft on",
        description=__doc__,
        example=("lmforge draft-data --target runs/small/final --data corpus/train.jsonl -o runs/draft-data.jsonl && "
                 "lmforge pretrain --preset tiny --distill-from runs/small/final --distill-temperature 0.25 "
                 "--data corpus/train.jsonl:0.5 runs/draft-data.jsonl:0.5 --tokenizer runs/small/final "
                 "--output-dir runs/draft"))
    parser.add_argument("--target", required=True, help="the target checkpoint (the draft's teacher)")
    parser.add_argument("--data", required=True, help="jsonl with a `text` field to cut prompts from (8-64 tokens each)")
    parser.add_argument("-o", "--output", required=True, help="jsonl to write (atomically)")
    parser.add_argument("--num-prompts", type=int, default=256, help="prompts, each from another document")
    parser.add_argument("--max-new-tokens", type=int, default=192, help="greedy target tokens per prompt (EOS ignored)")
    parser.add_argument("--seed", type=int, default=0, help="which documents and windows")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    out = write_target_continuations(args.target, args.data, args.output, num_prompts=args.num_prompts,
                                     max_new_tokens=args.max_new_tokens, seed=args.seed)
    print(f"wrote {out}", flush=True)
    return 0
