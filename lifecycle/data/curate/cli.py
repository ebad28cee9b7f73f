"""`lmforge curate`: raw text -> training-ready shards, a DatasetManifest and a report.

`lmforge curate run INPUTS -o DIR` runs the pipeline (pipeline.py) and writes report.md + manifest.json;
`lmforge curate train-classifier` fits the fast quality classifier the `classifier` block uses.
Settings: `--config curate.yaml` (sections as in config.py), then the flags below override it.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from lifecycle.errors import ConfigError

log = logging.getLogger(__name__)


def config_from_args(args: argparse.Namespace):
    from lifecycle.data.curate.config import CurateConfig

    raw: dict[str, Any] = {}
    if args.config:
        import yaml

        try:
            raw = yaml.safe_load(open(args.config, encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"--config {args.config}: {err}") from None
    if args.inputs:
        raw["inputs"] = list(args.inputs)
    for key in ("output_dir", "workers", "task_mb", "executor", "text_field", "txt_mode"):
        if getattr(args, key) is not None:
            raw[key] = getattr(args, key)

    def section(name: str) -> dict[str, Any]:
        value = raw.setdefault(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"--config {args.config}: {name} must be a mapping")
        return value

    for block in ("langid", "clean", "quality", "pii"):
        if block in (args.disable or []):
            section(block)["enabled"] = False
    for block in ("exact", "near"):
        if f"dedup_{block}" in (args.disable or []):
            section("dedup")[block] = False
    if args.remove_fillers:
        section("clean")["remove_fillers"] = True
    if args.languages:
        section("langid")["languages"] = args.languages.split(",")
    if args.dedup_threshold is not None:
        section("dedup")["threshold"] = args.dedup_threshold
    if args.decontam_task:
        section("decontam").update(enabled=True, tasks=args.decontam_task)
        if args.data_root:
            section("decontam")["data_root"] = args.data_root
    if args.perplexity_checkpoint:
        section("perplexity").update(enabled=True, checkpoint=args.perplexity_checkpoint)
    if args.classifier:
        section("classifier").update(enabled=True, model=args.classifier)
    if args.mix:
        weights = {}
        for item in args.mix:
            name, _, weight = item.partition("=")
            try:
                weights[name] = float(weight)
            except ValueError:
                raise ConfigError(f"--mix {item}: expected SOURCE=WEIGHT, e.g. --mix wiki=0.7") from None
        section("mix")["weights"] = weights
    if args.tokenizer:
        section("pack")["tokenizer"] = args.tokenizer
    if args.pack_seq_len:
        section("pack").update(enabled=True, seq_len=args.pack_seq_len)
    config = CurateConfig.from_dict(raw, where=args.config or "flags")
    if not config.inputs:
        raise ConfigError("no inputs: name files or directories (lmforge curate run data/ -o curated/)")
    return config


def curate(config, *, show_progress: bool = True):
    """Run the pipeline and write manifest + report; returns (manifest, report path)."""
    from lifecycle.data.curate.pipeline import quiet_datatrove, run_pipeline
    from lifecycle.data.curate.report import finalize
    from lifecycle.data.curate.shards import source_names

    quiet_datatrove()
    files = source_names(config.inputs)
    paths = run_pipeline(config, files, show_progress=show_progress)
    return finalize(config, paths)


def _cmd_run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    manifest, report = curate(config)
    cur = manifest.extra["curate"]
    print(f"{cur['read']['documents']} documents read, {manifest.num_documents} written "
          f"({manifest.num_tokens} tokens); {cur['num_problems']} input problems")
    print(f"report: {report}\nmanifest: {report.parent / 'manifest.json'}")
    return 0


def _cmd_train_classifier(args: argparse.Namespace) -> int:
    from lifecycle.data.curate.classifier import train_from_files

    model, metrics = train_from_files(args.good, args.bad, args.output, text_field=args.text_field,
                                      epochs=args.epochs, seed=args.seed)
    print(f"wrote {args.output}: held-out accuracy {metrics['heldout_accuracy']:.3f} "
          f"on {metrics['num_heldout']} documents")
    return 0


def add_command(sub: Any) -> None:
    from lifecycle.cli import add_subcommand

    group = add_subcommand(sub, "curate", help="curate raw text: language id, cleaning, quality, PII, dedup, mixing",
                           example="lmforge curate run data/ -o curated/ --workers 2")
    actions = group.add_subparsers(title="actions", metavar="ACTION")
    run = add_subcommand(
        actions, "run", help="run the curation pipeline; writes shards, manifest.json and report.md",
        example="lmforge curate run web/ zh/ -o curated/ --workers 2 --mix web=0.6 --mix zh=0.4",
        description=("Read jsonl/json/txt/csv/parquet files or directories, run the blocks (language id, cleaning, "
                     "quality rules, optional model-based quality, PII, exact + MinHash dedup, optional "
                     "decontamination against `lmforge eval` tasks, mixing) on datatrove, and write shards to "
                     "OUTPUT/data, manifest.json and report.md (+ PNG plots). Run the same command again after an "
                     "interruption: finished tasks are not redone."))
    run.add_argument("inputs", nargs="*", help="input files or directories; each is one source for --mix")
    run.add_argument("-o", "--output-dir", help="output directory (default: curated)")
    run.add_argument("--config", help="YAML with sections langid, clean, quality, perplexity, classifier, pii, "
                                      "dedup, decontam, mix, pack (lifecycle/data/curate/config.py)")
    run.add_argument("--workers", type=int, help="local worker processes (default 1)")
    run.add_argument("--task-mb", type=int, help="input MB per task at most: tasks per stage = input MB / this, "
                     "rounded up to a multiple of --workers (default 256; bounds each task's memory)")
    run.add_argument("--executor", choices=["local", "ray"], help="datatrove executor (default local)")
    run.add_argument("--text-field", help='field/column holding the text (default "text")')
    run.add_argument("--txt-mode", choices=["line", "paragraph", "file"], help="how .txt files split into documents")
    run.add_argument("--languages", help="languages to keep, ISO 639-1, comma-separated (default en,zh)")
    run.add_argument("--disable", action="append",
                     choices=["langid", "clean", "quality", "pii", "dedup_exact", "dedup_near"],
                     help="switch a block off (repeatable)")
    run.add_argument("--remove-fillers", action="store_true",
                     help="dialogue data: remove filler tokens (嗯嗯, 啊啊, um, uh; list in clean.fillers)")
    run.add_argument("--dedup-threshold", type=float, help="near-duplicate Jaccard threshold (default 0.7)")
    run.add_argument("--decontam-task", action="append", help="`lmforge eval` task (name or file) to "
                     "decontaminate against (repeatable)")
    run.add_argument("--data-root", help="where the tasks' data paths point (e.g. ../shared/data)")
    run.add_argument("--perplexity-checkpoint", help="checkpoint for the perplexity band filter")
    run.add_argument("--classifier", help="quality classifier .npz from `lmforge curate train-classifier`")
    run.add_argument("--mix", action="append", help="SOURCE=WEIGHT token share per source (repeatable)")
    run.add_argument("--tokenizer", help="tokenizer directory: token counts (and packing with --pack-seq-len)")
    run.add_argument("--pack-seq-len", type=int, help="also write packed token blocks of this length")
    run.set_defaults(func=_cmd_run)

    train = add_subcommand(
        actions, "train-classifier", help="fit the fast quality classifier (hashed n-gram logistic regression)",
        example="lmforge curate train-classifier --good good.jsonl --bad bad.jsonl -o quality.npz")
    train.add_argument("--good", nargs="+", required=True, help="files of text to keep")
    train.add_argument("--bad", nargs="+", required=True, help="files of text to drop")
    train.add_argument("-o", "--output", required=True, help="model file to write (.npz)")
    train.add_argument("--text-field", default="text", help='field/column holding the text (default "text")')
    train.add_argument("--epochs", type=int, default=5, help="passes over the examples (default 5)")
    train.add_argument("--seed", type=int, default=0, help="shuffling and held-out split seed")
    train.set_defaults(func=_cmd_train_classifier)
