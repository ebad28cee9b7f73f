"""The embedded default: the lifecycle on data every Python installation has.

No user data and no network: the corpus is the documentation text of the running interpreter's
standard library (docstrings, read with `ast`, and pydoc's language-reference topics). From it the
demo trains a byte-level BPE tokenizer, a `small` target model and a 2-layer draft model distilled
from it (the draft serves speculative decoding, so it is trained to predict the target, not the
corpus: on the corpus and on the target's own greedy continuations), then fine-tunes the target: SFT on "What does os.path.join do?" -> the documented summary, and
DPO from the SFT model where the rejected answer is another function's summary (`build_finetune_stages`);
the DPO checkpoint is the one served. Everything is left as checkpoints in a cache directory. Every stage is skipped when its verified output is already there, so a second run takes
seconds. Every step can be pointed at the user's own files with the underlying subcommands.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lifecycle.errors import CheckpointError

DEFAULT_CACHE = Path(os.environ.get("LMFORGE_HOME", Path.home() / ".cache" / "lmforge"))


@dataclass(frozen=True)
class DemoConfig:
    """Sized to stay under 10 minutes on a 2-core CPU even when this VM runs slow (measured numbers and the
    machine's speed drift in docs/BENCHMARKS.md)."""

    vocab_size: int = 8192
    seq_len: int = 256
    target_preset: str = "small"
    target_steps: int = 360
    target_lr: float = 1e-3
    draft_preset: str = "draft"  # `tiny` with 2 layers (lifecycle/presets.py)
    draft_steps: int = 240
    draft_lr: float = 3e-3
    # The draft learns KL(target || draft) on the corpus (lifecycle/recipes/distill.py). At temperature 0.25 the
    # KL weighs the order of the target's top tokens, which is what greedy verification accepts: greedy agreement
    # 0.75 vs 0.56 at T = 1 and 0.36 for a draft trained on the corpus alone, at the price of speculative
    # *sampling* acceptance (0.42 vs 0.69 at T = 1). docs/BENCHMARKS.md, "W3 draft quality".
    is_draft_distilled: bool = True
    draft_distill_temperature: float = 0.25
    # ... and on the target's own greedy continuations of corpus prompts for this share of its documents
    # (lifecycle/recipes/draft_data.py): the draft runs on the target's output, not on human text. Greedy
    # agreement 0.75 -> 0.90 on held-out prompts; docs/BENCHMARKS.md, "W3 draft quality". 0 turns it off.
    draft_continuations: int = 256
    draft_continuation_tokens: int = 192
    draft_continuation_share: float = 0.5
    # 512 tokens per step: on a budget this small the number of steps, not tokens per step, decides how far
    # the loss gets below the unigram plateau (at equal tokens, 400 steps of 2 sequences reached held-out
    # loss 6.17 where 100 steps of 8 reached 6.59 and emitted only whitespace).
    micro_batch_size: int = 2
    global_batch_size: int = 2
    eval_batches: int = 8
    seed: int = 0

    def key(self) -> str:
        """Cache key: these settings and the interpreter whose stdlib is the corpus."""
        payload = json.dumps(dataclasses.asdict(self), sort_keys=True) + sys.version
        return hashlib.sha256(payload.encode()).hexdigest()[:10]


@dataclass
class DemoArtifacts:
    root: Path
    corpus_dir: Path
    tokenizer_dir: Path
    target: Path
    draft: Path
    sft: Path | None = None  # set by build_finetune_stages
    dpo: Path | None = None


@dataclass(frozen=True)
class DemoFinetuneConfig:
    """The post-training legs of the demo: tens of steps each, so `make demo` stays under 10 minutes.

    Kept apart from DemoConfig so that its cache key (and the pretrained models it names) is unchanged;
    the SFT and DPO runs live in directories keyed by this config and the target checkpoint.
    """

    sft_steps: int = 40
    sft_lr: float = 3e-4
    dpo_steps: int = 20
    dpo_lr: float = 5e-5
    dpo_beta: float = 0.1
    batch_size: int = 4
    max_len: int = 160
    num_eval: int = 16
    seed: int = 0

    def key(self, target: Path) -> str:
        from lifecycle.data.manifest import sha256_file

        manifest = target / "manifest.json"
        payload = json.dumps(dataclasses.asdict(self), sort_keys=True) + (sha256_file(manifest) if manifest.is_file()
                                                                           else "")
        return hashlib.sha256(payload.encode()).hexdigest()[:10]


def _stage(name: str, started: float) -> None:
    print(f"[demo {time.perf_counter() - started:6.1f}s] {name}", flush=True)


def _verified(path: Path) -> bool:
    from lifecycle.checkpoint import load_checkpoint

    if not path.is_dir():
        return False
    try:
        load_checkpoint(path)
        return True
    except CheckpointError as err:
        print(f"cached checkpoint rejected, rebuilding: {err}", flush=True)
        return False


def _forget_other_teachers_students(run_dir: Path, teacher: Path) -> None:
    """A draft (final or half-trained) distilled from an earlier build of the target is retrained from
    scratch: resuming it under the new target would mix two teachers (the recipe refuses to)."""
    from lifecycle.data.manifest import sha256_file

    manifests = [run_dir / "final" / "manifest.json", *sorted(run_dir.glob("checkpoints/step-*/manifest.json"))]
    teacher_manifest = teacher / "manifest.json"
    want = sha256_file(teacher_manifest) if teacher_manifest.is_file() else None
    for path in (m for m in manifests if m.is_file()):
        if json.loads(path.read_text())["extra"].get("distilled_from", {}).get("manifest_sha256") != want:
            print(f"{run_dir} was distilled from another build of the target; retraining it", flush=True)
            shutil.rmtree(run_dir)
            return


def prepare_default_data(root: Path, vocab_size: int, *, progress: bool = True,
                         started: float | None = None) -> tuple[Path, Path]:
    """The stdlib documentation corpus in `root/corpus` and a BPE tokenizer on it in `root/tokenizer`,
    each built once; returns (train.jsonl, heldout.jsonl)."""
    from lifecycle.data.readers import iter_documents
    from lifecycle.data.stdlib_corpus import build_stdlib_corpus
    from lifecycle.tokenizer import save_tokenizer, train_tokenizer

    started = time.perf_counter() if started is None else started
    corpus_dir, tokenizer_dir = root / "corpus", root / "tokenizer"
    if not (corpus_dir / "corpus.json").is_file():
        _stage("building the corpus from the Python standard library's documentation", started)
        print(f"  {build_stdlib_corpus(corpus_dir)}", flush=True)
    train_file = corpus_dir / "train.jsonl"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        _stage(f"training a {vocab_size}-token byte-level BPE tokenizer", started)
        texts = (d.text for d in iter_documents([train_file]))
        save_tokenizer(train_tokenizer(texts, vocab_size=vocab_size, show_progress=progress), tokenizer_dir)
    return train_file, corpus_dir / "heldout.jsonl"


def build_demo(cache_dir: Path = DEFAULT_CACHE, cfg: DemoConfig = DemoConfig(), *, progress: bool = True) -> DemoArtifacts:
    """Build (or reuse) the demo corpus, tokenizer, target and draft checkpoints."""
    from lifecycle.recipes.pretrain import PretrainConfig, pretrain

    started = time.perf_counter()
    root = Path(cache_dir) / f"demo-{cfg.key()}"
    art = DemoArtifacts(root=root, corpus_dir=root / "corpus", tokenizer_dir=root / "tokenizer",
                        target=root / "target" / "final", draft=root / "draft" / "final")
    root.mkdir(parents=True, exist_ok=True)

    train_file, heldout_file = prepare_default_data(root, cfg.vocab_size, progress=progress, started=started)

    for role, preset, steps, lr in (("target", cfg.target_preset, cfg.target_steps, cfg.target_lr),
                                    ("draft", cfg.draft_preset, cfg.draft_steps, cfg.draft_lr)):
        final = getattr(art, role)
        teacher = art.target if role == "draft" and cfg.is_draft_distilled else None
        if teacher is not None:
            _forget_other_teachers_students(final.parent, teacher)
        if _verified(final):
            _stage(f"{role} ({preset}) checkpoint cached: {final}", started)
            continue
        how = "distilling the draft model from the target" if teacher else f"pretraining the {role} model"
        data = [str(train_file)]
        if teacher is not None and cfg.draft_continuations > 0:
            continuations = _target_continuations(art, train_file, cfg, started)
            share = cfg.draft_continuation_share
            data = [f"{train_file}:{1 - share:g}", f"{continuations}:{share:g}"]
        _stage(f"{how} (preset {preset}, {steps} steps)", started)
        pretrain(PretrainConfig(
            data=data, eval_data=[str(heldout_file)], tokenizer=str(art.tokenizer_dir),
            preset=preset, output_dir=str(final.parent), seq_len=cfg.seq_len,
            micro_batch_size=cfg.micro_batch_size, global_batch_size=cfg.global_batch_size, max_steps=steps,
            learning_rate=lr, warmup_steps=max(1, steps // 20), eval_every=max(1, steps // 2),
            eval_batches=cfg.eval_batches, distill_from=str(teacher) if teacher else None,
            distill_temperature=cfg.draft_distill_temperature,
            save_every=max(1, steps // 2), seed=cfg.seed, progress=progress))
    _stage("done", started)
    return art


def _target_continuations(art: DemoArtifacts, train_file: Path, cfg: DemoConfig, started: float) -> Path:
    """The target's greedy continuations the draft distils on, generated once per build of the target."""
    from lifecycle.checkpoint import load_checkpoint
    from lifecycle.recipes.draft_data import continuations_target_sha, write_target_continuations

    path = art.root / "draft-data" / "continuations.jsonl"
    if path.is_file() and continuations_target_sha(path) == load_checkpoint(art.target).manifest_sha256():
        return path
    _stage(f"the target's greedy continuations of {cfg.draft_continuations} corpus prompts "
           f"({cfg.draft_continuation_tokens} tokens each) for the draft to learn from", started)
    return write_target_continuations(art.target, train_file, path, num_prompts=cfg.draft_continuations,
                                      max_new_tokens=cfg.draft_continuation_tokens, seed=cfg.seed)


def write_instruction_data(corpus_file: Path, out_dir: Path, cfg: DemoFinetuneConfig) -> dict[str, Path]:
    """SFT pairs ("What does os.path.join do?" -> its documented summary) and DPO pairs (rejected: the summary of
    another function) from the stdlib corpus; as many as the steps use, plus `num_eval` held out of each."""
    import random

    from lifecycle.data.manifest import atomic_write_text

    docs = [json.loads(line) for line in corpus_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    docs = [d for d in docs if d.get("kind") in ("function", "class") and 20 <= len(d.get("summary", "")) <= 240]
    rng = random.Random(cfg.seed)
    rng.shuffle(docs)
    num_sft, num_dpo = cfg.sft_steps * cfg.batch_size, cfg.dpo_steps * cfg.batch_size
    sft_docs, dpo_docs = docs[:num_sft + cfg.num_eval], docs[num_sft + cfg.num_eval:][:num_dpo + cfg.num_eval]
    if len(dpo_docs) < num_dpo + cfg.num_eval:
        from lifecycle.errors import DataError

        raise DataError(f"{corpus_file}: only {len(docs)} documented functions; the demo needs "
                        f"{num_sft + num_dpo + 2 * cfg.num_eval}")

    def question(doc: dict[str, Any]) -> str:
        return f"What does {doc['qualname']} do?"

    sft = [{"instruction": question(d), "output": d["summary"]} for d in sft_docs]
    dpo = [{"prompt": question(d), "chosen": d["summary"], "rejected": dpo_docs[(i + 1) % len(dpo_docs)]["summary"]}
           for i, d in enumerate(dpo_docs)]
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, rows, n_train in (("sft", sft, num_sft), ("dpo", dpo, num_dpo)):
        for split, part in (("train", rows[:n_train]), ("eval", rows[n_train:])):
            files[f"{name}_{split}"] = out_dir / f"{name}_{split}.jsonl"
            atomic_write_text(files[f"{name}_{split}"], "".join(json.dumps(r) + "\n" for r in part))
    return files


def build_finetune_stages(art: DemoArtifacts, cfg: DemoFinetuneConfig = DemoFinetuneConfig(), *,
                          progress: bool = True, started: float | None = None) -> DemoArtifacts:
    """SFT of the target on stdlib instruction pairs, then DPO from the SFT checkpoint; sets art.sft and art.dpo."""
    from lifecycle.recipes.dpo import DPORecipeConfig, dpo
    from lifecycle.recipes.sft import SFTRecipeConfig, sft

    started = time.perf_counter() if started is None else started
    root = art.root / f"finetune-{cfg.key(art.target)}"
    art.sft, art.dpo = root / "sft" / "final", root / "dpo" / "final"
    if _verified(art.sft) and _verified(art.dpo):
        _stage(f"SFT and DPO checkpoints cached: {art.dpo}", started)
        return art
    files = write_instruction_data(art.corpus_dir / "train.jsonl", root / "data", cfg)
    common = dict(max_len=cfg.max_len, micro_batch_size=cfg.batch_size, global_batch_size=cfg.batch_size,
                  seed=cfg.seed, progress=progress, warmup_ratio=0.1)
    if not _verified(art.sft):
        _stage(f"SFT on stdlib instruction pairs ({cfg.sft_steps} steps)", started)
        sft(SFTRecipeConfig(init_from=str(art.target), data=[str(files["sft_train"])],
                            eval_data=[str(files["sft_eval"])], output_dir=str(art.sft.parent),
                            max_steps=cfg.sft_steps, learning_rate=cfg.sft_lr, eval_every=0,
                            save_every=cfg.sft_steps, **common))
    if not _verified(art.dpo):
        _stage(f"DPO against the SFT model; rejected = another function's doc ({cfg.dpo_steps} steps)", started)
        dpo(DPORecipeConfig(init_from=str(art.sft), data=[str(files["dpo_train"])], eval_data=[str(files["dpo_eval"])],
                            output_dir=str(art.dpo.parent), max_steps=cfg.dpo_steps, learning_rate=cfg.dpo_lr,
                            beta=cfg.dpo_beta, eval_every=0, save_every=cfg.dpo_steps, **common))
    return art


def _sample(checkpoint: Path, prompts: list[str], max_new_tokens: int = 40) -> list[str]:
    """Greedy continuations from lmforge's own serving engine (paged KV cache, continuous batching)."""
    from serve.engine.llm_engine import EngineConfig, LLMEngine
    from serve.types import SamplingParams

    engine = LLMEngine(EngineConfig(model=str(checkpoint)))
    outputs = engine.generate(prompts, SamplingParams(max_tokens=max_new_tokens, temperature=0.0))
    return [out.outputs[0].text for out in outputs]


def add_command(sub: Any) -> None:
    from lifecycle.cli import add_subcommand

    parser = add_subcommand(
        sub, "demo", help="run the lifecycle on the embedded default (Python's own documentation)",
        description=("Build a corpus from the Python standard library's documentation, train a tokenizer, a "
                     "`small` target and a 2-layer draft model, fine-tune the target (SFT on \"what does X do?\" "
                     "pairs from the same documentation, then DPO), print where the checkpoints are, then serve the "
                     "DPO model over gRPC, chat with it for a few turns and evaluate it through the server. No data "
                     "or network needed; about 10 minutes the first time on 2 CPU cores, under a minute when cached."),
        example="lmforge demo --cache-dir ~/.cache/lmforge")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help=f"where the demo artifacts live (default: $LMFORGE_HOME or {DEFAULT_CACHE})")
    parser.add_argument("--target-steps", type=int, default=DemoConfig.target_steps,
                        help="optimizer steps for the small target model")
    parser.add_argument("--draft-steps", type=int, default=DemoConfig.draft_steps,
                        help="optimizer steps for the draft model")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    parser.add_argument("--no-finetune", action="store_true",
                        help="skip the SFT and DPO stages (serve the pretrained target)")
    parser.add_argument("--no-serve", action="store_true",
                        help="stop after training: skip serving the target, the chat and the evaluation")
    parser.add_argument("--data-root", default=None,
                        help="the shared datasets (adds ARC-Easy to the evaluation; default $LMFORGE_DATA_ROOT "
                             "or ../shared/data beside the checkout when present)")
    parser.set_defaults(func=_run)


def _run(args: Any) -> int:
    from lifecycle.errors import ConfigError

    if args.target_steps <= 0 or args.draft_steps <= 0:
        raise ConfigError("--target-steps and --draft-steps must be positive")
    cfg = DemoConfig(target_steps=args.target_steps, draft_steps=args.draft_steps)
    art = build_demo(args.cache_dir, cfg, progress=not args.no_progress)
    if not args.no_finetune:
        build_finetune_stages(art, progress=not args.no_progress)
    prompts = ["os.path.join(a, *p)\n\nJoin two or more", "json.dumps(obj, *, skipkeys=False)\n\n"]
    print("\nsamples (greedy, target model, lmforge engine):")
    for prompt, text in zip(prompts, _sample(art.target, prompts)):
        print(f"  {prompt + text!r}")
    if art.dpo is not None:
        questions = ["What does os.path.join do?", "What does json.dumps do?"]
        chat = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in questions]
        for name, ckpt in (("SFT", art.sft), ("DPO", art.dpo)):
            print(f"\nanswers (greedy, {name} model, lmforge engine):")
            for question, text in zip(questions, _sample(ckpt, chat)):
                print(f"  {question} -> {text.split('<|im_end|>')[0].strip()!r}")
    print("\ncheckpoints:")
    print(f"  tokenizer  {art.tokenizer_dir}")
    print(f"  target     {art.target}")
    print(f"  draft      {art.draft}")
    print(f"  loss curves {art.target.parent / 'loss_curve.png'}, {art.draft.parent / 'loss_curve.png'}")
    if art.dpo is not None:
        print(f"  sft        {art.sft}  (curves: {art.sft.parent / 'curves.png'})")
        print(f"  dpo        {art.dpo}  (curves: {art.dpo.parent / 'curves.png'}; served)")
    if not args.no_serve:
        _serve_and_try(art, args.data_root)
    return 0


def _serve_and_try(art: DemoArtifacts, data_root: str | None) -> None:
    """Serve the target over gRPC, chat a few turns and evaluate it through the server (serve/demo.py)."""
    try:
        import grpc  # noqa: F401 - the serve extra
    except ImportError:
        print("\n(skipping the serving demo: install lmforge[serve] for gRPC)")
        return
    from serve.demo import serve_chat_and_evaluate

    started = time.perf_counter()
    serve_chat_and_evaluate(art.dpo or art.target, art.corpus_dir / "heldout.jsonl", art.root / "eval", data_root=data_root)
    print(f"[demo] serving, chat and evaluation took {time.perf_counter() - started:.1f}s")
