"""`lmforge quantize`: one method (`--method`) or several (`--compare`), each a checkpoint under
--output-dir, then the report (report.json, report.md, size_vs_perplexity.png in --output-dir).

Everything that can be wrong with the input is checked before anything is written: the method specs,
the checkpoint (hashes verified, not already quantized), the group size against the model's shapes,
the calibration text (not empty, not shorter than --seq-len), the output directory.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

from lifecycle.errors import CheckpointError, ConfigError

DEFAULT_COMPARE = "gptq:4:128,gptq:3:128,rtn:4:128,int8,nf4"  # the set (g128 needs dims divisible by 128)
REPO_ROOT = Path(__file__).resolve().parents[1]


def default_wikitext() -> Path:
    root = Path(os.environ.get("LMFORGE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    return root / "pretrain" / "wikitext-2" / "test.txt"


def add_command(sub: Any) -> None:
    from lifecycle.cli import add_subcommand

    p = add_subcommand(sub, "quantize", help="quantize a checkpoint (GPTQ, RTN, int8, NF4) and report what it cost",
                       example="lmforge quantize runs/small/final --compare gptq:4:32,gptq:3:32,rtn:4:32,int8,nf4 "
                               "-o runs/small/quant")
    p.add_argument("checkpoint", help="checkpoint directory (unquantized; its hashes are verified)")
    p.add_argument("-o", "--output-dir", required=True, help="one checkpoint per method is written here, plus the report")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--method", default=None, help="METHOD[:BITS[:GROUP]][@SOLVER]: gptq:4:128, rtn:3:channel, int8, "
                                                      "nf4, gptq:4:128@gptqmodel (GPTQModel's solver; default "
                                                      "gptq:4:128 with ours)")
    which.add_argument("--compare", default=None, help=f"comma-separated methods to run and compare (e.g. {DEFAULT_COMPARE})")
    p.add_argument("--calibration-data", nargs="+", default=None,
                   help="calibration text files (jsonl/json/txt/parquet/csv); default: the checkpoint's training data "
                        "named in its manifest")
    p.add_argument("--text-field", default="text", help="field holding the text in --calibration-data")
    p.add_argument("--num-samples", type=int, default=128, help="calibration sequences (GPTQ)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (GPTQ)")
    p.add_argument("--asym", action="store_true", help="asymmetric grids (default symmetric)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: columns by decreasing Hessian diagonal")
    p.add_argument("--static-groups", action="store_true", help="GPTQ with --act-order: groups fixed before solving")
    p.add_argument("--no-true-sequential", action="store_true", help="GPTQ: calibrate a block's linears all at once")
    p.add_argument("--damp-percent", type=float, default=0.01, help="GPTQ: damping as a share of mean(diag H)")
    p.add_argument("--block-size", type=int, default=128, help="GPTQ: columns per lazy batch update")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="quantize the LM head too, with the same method (default: kept in fp16, as embeddings always are); "
                        "our engine runs it; transformers loads it for int8/nf4 but not for gptq/rtn (its GPTQ loader "
                        "quantizes only the decoder blocks)")
    p.add_argument("--no-double-quant", action="store_true", help="nf4: keep absmax in fp32")
    p.add_argument("--eval-seq-len", type=int, default=512, help="tokens per perplexity block")
    p.add_argument("--eval-blocks", type=int, default=40, help="perplexity blocks per held-out set")
    p.add_argument("--wikitext", default=str(default_wikitext()),
                   help="WikiText-2 text for perplexity ('none' to skip; skipped with a note when absent)")
    p.add_argument("--eval-set", action="append", default=[], metavar="NAME=FILE[,FILE...]",
                   help="another held-out set for perplexity and KL, under NAME (repeatable; files read as "
                        "--calibration-data, field --text-field), e.g. demo=corpus/heldout.jsonl")
    p.add_argument("--decode-tokens", type=int, default=128, help="tokens decoded to measure speed (0: skip)")
    p.add_argument("--no-eval", action="store_true", help="write the checkpoints only: no perplexity, no speed")
    p.add_argument("--overwrite", action="store_true", help="replace existing method directories")
    p.add_argument("--reuse-existing", action="store_true",
                   help="a method directory that already holds this method's checkpoint of this parent (same "
                        "QuantConfig and calibration source in its manifest) is evaluated, not quantized again")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _slug(label: str) -> str:
    return label.replace(":", "-").replace("@", "-")


def run(args: Any) -> int:
    from lifecycle.checkpoint import check_output_dir
    from quant.config import parse_spec
    from quant.quantize import calibration_ids, check_shapes, open_source

    progress = not args.no_progress
    specs = [s for s in (args.compare or args.method or "gptq:4:128").split(",") if s.strip()]
    if not specs:
        raise ConfigError("--compare: no methods given")
    overrides = dict(num_samples=args.num_samples, seq_len=args.seq_len, sym=not args.asym, act_order=args.act_order,
                     static_groups=args.static_groups, true_sequential=not args.no_true_sequential,
                     damp_percent=args.damp_percent, block_size=args.block_size,
                     double_quant=not args.no_double_quant, quantize_lm_head=args.quantize_lm_head, seed=args.seed)
    cfgs = [parse_spec(s, **overrides) for s in specs]
    labels = [c.label for c in cfgs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--compare: a method is listed twice ({', '.join(labels)})")
    if args.eval_seq_len < 2 or args.eval_blocks < 1 or args.decode_tokens < 0:
        raise ConfigError("--eval-seq-len must be >= 2, --eval-blocks >= 1, --decode-tokens >= 0")
    _extra_eval_sets(args.eval_set, taken={"own", "wikitext2"})  # a malformed --eval-set fails before any work
    src = open_source(args.checkpoint)
    for cfg in cfgs:
        check_shapes(src, cfg)
    out = Path(args.output_dir)
    check_output_dir(out, src.path)
    targets = [out / _slug(label) for label in labels]
    existing = [t for t in targets if t.exists()]
    if args.reuse_existing and args.overwrite:
        raise ConfigError("--reuse-existing and --overwrite contradict each other; pass one")
    if existing and not args.overwrite and not args.reuse_existing:
        raise CheckpointError(f"{existing[0]}: already exists; pass --overwrite to replace it")
    calib, calib_source = None, "-"
    if any(c.method == "gptq" for c in cfgs):
        calib, calib_source = calibration_ids(src, cfgs[0], args.calibration_data, args.text_field)
    reused = {t: _existing(t, src, c, calib_source) for c, t in zip(cfgs, targets) if args.reuse_existing and t.exists()}
    eval_sets = {} if args.no_eval else _eval_sets(src, args)

    from quant.divergence import ParentLogProbs

    out.mkdir(parents=True, exist_ok=True)
    # The parent's log-probs of every eval position, float32 on disk under --output-dir (deleted at the end),
    # so each child's KL from the parent comes out of the same pass as its perplexity.
    cache = ParentLogProbs(eval_sets, int(src.config["vocab_size"]), out) if eval_sets else None
    try:
        return _run_methods(args, src, cfgs, targets, calib, calib_source, eval_sets, cache, reused, progress)
    finally:
        if cache is not None:
            cache.close()


def _run_methods(args, src, cfgs, targets, calib, calib_source, eval_sets, cache, reused, progress) -> int:
    from quant.divergence import evaluate_set
    from quant.quantize import quantize_checkpoint
    from quant.report import decode_speed, load_dequantized, relative, sizes, write_report

    out = Path(args.output_dir)
    before: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    base_speed: dict[str, Any] = {}
    if eval_sets:
        parent_model = src.load_model(dtype=_f32()).eval()
        before = {name: evaluate_set(parent_model, blocks, name, cache, parent=True, desc=f"ppl {name} (fp32)",
                                     progress=progress)["perplexity"]
                  for name, blocks in eval_sets.items()}
        if args.decode_tokens:
            base_speed = decode_speed(src.path, _prompt(src), args.decode_tokens, reference=parent_model)
        del parent_model
        rows.append({"method": "fp32 (parent)", "bits": 32, "group_size": None, "linear_size_vs_fp16": 2.0,
                     "size_vs_fp16": 2.0, "perplexity": {n: {"before": v, "after": v, "relative_change": 0.0}
                                                         for n, v in before.items()},
                     "divergence": {n: {"kl_mean": 0.0, "kl_p99": 0.0, "top1_agreement": 1.0} for n in before},
                     "calibration_s": None, "quantize_s": None, **base_speed})
    for cfg, target in zip(cfgs, targets):
        print(f"== {cfg.label} -> {target}")
        t0 = time.perf_counter()
        if target not in reused and args.reuse_existing and target.exists():  # made while this run went on
            reused[target] = _existing(target, src, cfg, calib_source)
        if target in reused:
            print(f"   reusing {target} (same QuantConfig, parent and calibration)")
            outcome = reused[target]
        elif cfg.solver == "gptqmodel":
            from quant.gptqmodel_backend import quantize_with_gptqmodel

            outcome = quantize_with_gptqmodel(src, target, cfg, calib, calib_source=calib_source,
                                              overwrite=args.overwrite)
        else:
            outcome = quantize_checkpoint(src, target, cfg, calib=calib, calib_source=calib_source,
                                          progress=progress, overwrite=args.overwrite)
        row: dict[str, Any] = {"method": cfg.label, "bits": cfg.bits, "group_size": cfg.group_size or "channel"
                               if cfg.method in ("gptq", "rtn") else None, "checkpoint": str(target),
                               "calibration_s": outcome.calibration_s if cfg.method == "gptq" else None,
                               "quantize_s": time.perf_counter() - t0, "config": cfg.to_dict(),
                               **sizes(src.config, target)}
        if cfg.method == "nf4":
            row["group_size"] = f"block {cfg.nf4_blocksize}"
        if target in reused:  # made by an earlier run, which timed it
            row.update(calibration_s=None, quantize_s=None, reused=True)
        if eval_sets:
            model = load_dequantized(src.path, target)
            row["perplexity"], row["divergence"] = {}, {}
            for name, blocks in eval_sets.items():
                ev = evaluate_set(model, blocks, name, cache, parent=False, desc=f"ppl {name} ({cfg.label})",
                                  progress=progress)
                after = ev.pop("perplexity")
                row["perplexity"][name] = {"before": before[name], "after": after,
                                           "relative_change": relative(after, before[name])}
                row["divergence"][name] = ev  # KL(parent || this) mean and p99, top-1 agreement, positions
            if args.decode_tokens:
                speed = decode_speed(target, _prompt(src), args.decode_tokens, reference=model)
                row.update(speed)
                if base_speed.get("decode_tokens_per_s") and speed.get("decode_tokens_per_s"):
                    row["decode_speedup_vs_fp32"] = speed["decode_tokens_per_s"] / base_speed["decode_tokens_per_s"]
            del model
        rows.append(row)
        if len(rows) < len(cfgs) + bool(eval_sets):  # what is done so far, in case a long run is stopped
            write_report(_report(src, calib, calib_source, args, eval_sets, rows), out)
    report = _report(src, calib, calib_source, args, eval_sets, rows)
    paths = write_report(report, out)
    from quant.report import markdown

    print(markdown(report))
    for note in report["meta"]["notes"]:
        print(f"note: {note}")
    print(f"report: {paths['json']}, {paths['markdown']}, {paths['plot']}")
    return 0


def _report(src, calib, calib_source, args, eval_sets, rows) -> dict[str, Any]:
    report = {"meta": {"checkpoint": str(src.path), "calibration": calib_source,
                       "num_samples": int(calib.shape[0]) if calib is not None else 0, "seq_len": args.seq_len,
                       "eval_seq_len": args.eval_seq_len, "eval_blocks": {n: int(b.shape[0]) for n, b in eval_sets.items()},
                       "eval_sources": getattr(args, "_eval_sources", {}),
                       "decode_tokens": args.decode_tokens, "notes": getattr(args, "_notes", [])},
              "eval_sets": list(eval_sets), "rows": rows}
    report["meta"]["eval_blocks"] = max(report["meta"]["eval_blocks"].values(), default=0)
    return report


def _existing(target: Path, src, cfg, calib_source: str):
    """--reuse-existing: the checkpoint already in `target`, when it is this method of this parent (else an error)."""
    from lifecycle.checkpoint import load_checkpoint
    from quant.quantize import QuantizeOutcome

    ckpt = load_checkpoint(target)  # verifies its hashes
    recipe = (ckpt.manifest or {}).get("recipe_config") or {}
    parent = (ckpt.manifest or {}).get("parent") or {}
    wanted_calib = calib_source if cfg.method == "gptq" else None
    if (recipe.get("quant") != cfg.to_dict() or parent.get("manifest_sha256") != src.manifest_sha256()
            or recipe.get("calibration") != wanted_calib):
        raise CheckpointError(f"{target / 'manifest.json'}: --reuse-existing: recipe_config/parent are not {cfg.label} "
                              f"of {src.path}" + (f" calibrated on {wanted_calib}" if wanted_calib else "")
                              + " with these options; pass --overwrite to replace it")
    return QuantizeOutcome(ckpt, 0.0, int(recipe.get("num_calibration_samples") or 0), calib_source)


def _f32():
    import torch

    return torch.float32


def _prompt(src) -> list[int]:
    tok = src.load_tokenizer()
    ids = tok("def main():\n    import os\n", add_special_tokens=False)["input_ids"]
    return ids or [random.Random(0).randrange(src.config["vocab_size"])]


def _extra_eval_sets(specs: list[str], taken: set[str]) -> list[tuple[str, list[str]]]:
    """`--eval-set NAME=FILE[,FILE...]` values, checked: a name once, not `own`/`wikitext2`, files that exist."""
    from lifecycle.errors import DataError

    out: list[tuple[str, list[str]]] = []
    for spec in specs:
        name, sep, files = spec.partition("=")
        name = name.strip()
        paths = [f.strip() for f in files.split(",") if f.strip()]
        if not sep or not name or not paths:
            raise ConfigError(f"--eval-set {spec!r}: expected NAME=FILE[,FILE...]")
        if not all(c.isalnum() or c in "-_." for c in name):
            raise ConfigError(f"--eval-set {spec!r}: NAME may hold letters, digits, '-', '_' and '.' only")
        if name in taken:
            raise ConfigError(f"--eval-set {spec!r}: the set name {name!r} is already used")
        for path in paths:
            if not Path(path).exists():
                raise DataError(f"--eval-set {name}: {path} not found")
        taken.add(name)
        out.append((name, paths))
    return out


def _eval_sets(src, args) -> dict[str, Any]:
    """Held-out blocks: the checkpoint's own corpus, WikiText-2 (when the file is there) and every --eval-set."""
    from lifecycle.errors import DataError
    from quant import calibration

    tok = src.load_tokenizer()
    max_len = int(src.config.get("max_position_embeddings", args.eval_seq_len))
    seq_len = min(args.eval_seq_len, max_len)
    args._notes = []
    args._eval_sources = {}
    sets = {}
    try:
        sets["own"] = calibration.eval_blocks(tok, calibration.heldout_texts(src), seq_len=seq_len,
                                              max_blocks=args.eval_blocks, source=f"{src.path} held-out data")
        args._eval_sources["own"] = f"{src.path}: the held-out documents of its training data"
    except DataError as err:
        args._notes.append(f"own held-out text skipped: {err}")
    if args.wikitext and args.wikitext.lower() != "none":
        path = Path(args.wikitext)
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            sets["wikitext2"] = calibration.eval_blocks(tok, [text], seq_len=seq_len, max_blocks=args.eval_blocks,
                                                        source=str(path))
            args._eval_sources["wikitext2"] = str(path)
        else:
            args._notes.append(f"WikiText-2 skipped: {path} not found")
    for name, paths in _extra_eval_sets(getattr(args, "eval_set", None) or [], taken={"own", "wikitext2"}):
        sets[name] = calibration.eval_blocks(tok, calibration.file_texts(paths, text_field=args.text_field),
                                             seq_len=seq_len, max_blocks=args.eval_blocks, source=",".join(paths))
        args._eval_sources[name] = ",".join(paths)
    if not sets:
        raise DataError("no held-out text for perplexity: " + "; ".join(args._notes) + " (or pass --no-eval)")
    args.eval_seq_len = seq_len
    return sets
