"""After the stages: the DatasetManifest and a report a person can check (markdown + PNG plots).

The manifest (`<output>/manifest.json`, lifecycle.data.manifest.DatasetManifest) holds the inputs with
their sha256 and counts, `removed` per "block/reason", the token count, and under `extra.curate`: the
whole config, counts in/out per block, changes per block, tokens per language and source, the mixture
(target and realized shares), input problems (file:line: reason) and every output file's sha256.

`report.md` shows the same numbers, the plots (lengths before/after, languages, removal reasons) and,
for every rule, samples of the documents it removed.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from lifecycle.data.curate.config import CurateConfig
from lifecycle.data.curate.pipeline import Paths
from lifecycle.data.curate.step import read_counts, read_samples
from lifecycle.data.manifest import DatasetManifest, SourceInfo, atomic_write_text, sha256_file

BLOCK_ORDER = ("read", "langid", "clean", "quality", "classifier", "perplexity", "pii", "decontam",
               "dedup_exact", "dedup_near", "mix", "output")
MAX_PROBLEMS = 200


def _sub(counts: Counter[str], prefix: str) -> dict[str, int]:
    return {k[len(prefix):]: v for k, v in sorted(counts.items()) if k.startswith(prefix)}


def collect(paths: Paths) -> dict[str, Counter[str]]:
    return {block: c for block in BLOCK_ORDER if (c := read_counts(paths.work, block))}


def build_manifest(config: CurateConfig, paths: Paths, counts: dict[str, Counter[str]]) -> DatasetManifest:
    files: dict[str, dict[str, int]] = {}
    for part in sorted((paths.work / "files").glob("*.json")):  # one per rank; a split file is in several
        for path, n in json.loads(part.read_text(encoding="utf-8")).items():
            total = files.setdefault(path, {"num_documents": 0, "num_skipped": 0})
            total["num_documents"] += n["num_documents"]
            total["num_skipped"] += n["num_skipped"]
    sources = [SourceInfo.from_file(p, num_documents=files[p]["num_documents"], num_skipped=files[p]["num_skipped"])
               for p in sorted(files)]
    removed: dict[str, int] = {}
    blocks: dict[str, Any] = {}
    for block, c in counts.items():
        if block == "read":
            continue
        blocks[block] = {"in": c.get("in", 0), "out": c.get("out", 0), "removed": _sub(c, "removed/"),
                         "changed": _sub(c, "changed/"), "changed_documents": _sub(c, "changed_docs/")}
        for reason, n in _sub(c, "removed/").items():
            removed[f"{block}/{reason}"] = n
    out = counts.get("output", Counter())
    problems: list[str] = []
    for part in sorted((paths.work / "problems").glob("*.txt")):
        problems += part.read_text(encoding="utf-8").splitlines()
    outputs = [{"path": str(p.relative_to(paths.output)), "sha256": sha256_file(p), "num_bytes": p.stat().st_size}
               for p in sorted([*(paths.output / "data").glob("*.jsonl"), *(paths.output / "packed").glob("*.bin")])]
    tokens_by_source = _sub(out, "tokens/source/")
    total = sum(tokens_by_source.values()) or 1
    weights = dict(config.mix.weights)
    wsum = sum(weights.values()) or 1
    mix_rates = paths.work / "mix_rates.json"
    read = counts.get("read", Counter())
    extra = {"curate": {
        "config": config.to_dict(),
        "token_unit": "tokenizer" if config.pack.tokenizer else "approx (whitespace words + CJK characters)",
        "read": {"files": read.get("files", 0), "documents": read.get("documents", 0),
                 "problems": _sub(read, "problem/")},
        "problems": problems[:MAX_PROBLEMS], "num_problems": len(problems),
        "blocks": blocks,
        "languages_detected": _sub(counts.get("langid", Counter()), "detected/"),
        "tokens_per_language": _sub(out, "tokens/language/"), "tokens_per_source": tokens_by_source,
        "documents_per_language": _sub(out, "docs/language/"), "documents_per_source": _sub(out, "docs/source/"),
        "mixture": {"target": {s: w / wsum for s, w in weights.items()},
                    "realized": {s: n / total for s, n in tokens_by_source.items()},
                    "keep_rates": json.loads(mix_rates.read_text()) if mix_rates.is_file() else {}},
        "packed_blocks": out.get("packed_blocks", 0),
        "outputs": outputs,
    }}
    return DatasetManifest(sources=sources, num_documents=out.get("out", 0), num_tokens=out.get("tokens", 0),
                           removed=removed, extra=extra)


def _bins(c: Counter[str]) -> dict[int, int]:
    return {int(k): v for k, v in _sub(c, "length_log2/").items()}


def write_plots(paths: Paths, counts: dict[str, Counter[str]]) -> list[str]:
    from lifecycle.plots import new_figure, save_figure

    written = []
    before, after = _bins(counts.get("read", Counter())), _bins(counts.get("output", Counter()))
    if before or after:
        fig, ax = new_figure(figsize=(7, 4))
        keys = sorted(set(before) | set(after))
        xs = list(range(len(keys)))
        ax.bar([x - 0.2 for x in xs], [before.get(k, 0) for k in keys], width=0.4, label="input")
        ax.bar([x + 0.2 for x in xs], [after.get(k, 0) for k in keys], width=0.4, label="output")
        ax.set_xticks(xs, [f"{2**k}" for k in keys], rotation=45)
        ax.set_xlabel("document length, characters (bin starts, log2 bins)")
        ax.set_ylabel("documents")
        ax.legend()
        ax.set_title("Document lengths before and after curation")
        save_figure(fig, paths.output / "lengths.png")
        written.append("lengths.png")
    langs = _sub(counts.get("langid", Counter()), "detected/")
    if langs:
        fig, ax = new_figure(figsize=(7, 4))
        items = sorted(langs.items(), key=lambda kv: -kv[1])[:20]
        ax.bar([k for k, _ in items], [v for _, v in items])
        ax.set_ylabel("documents")
        ax.set_title("Detected languages (before removal)")
        save_figure(fig, paths.output / "languages.png")
        written.append("languages.png")
    reasons = {f"{b}/{r}": n for b, c in counts.items() for r, n in _sub(c, "removed/").items()}
    if reasons:
        items = sorted(reasons.items(), key=lambda kv: -kv[1])[:25]
        fig, ax = new_figure(figsize=(8, 0.35 * len(items) + 1.5))
        ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1])
        ax.set_xlabel("documents removed")
        ax.set_title("Removal reasons")
        save_figure(fig, paths.output / "removals.png")
        written.append("removals.png")
    return written


def write_report(config: CurateConfig, paths: Paths, manifest: DatasetManifest, plots: list[str]) -> Path:
    cur = manifest.extra["curate"]
    lines = ["# Curation report", "",
             f"{cur['read']['documents']} documents read from {cur['read']['files']} files; "
             f"{manifest.num_documents} written, {manifest.num_tokens} tokens ({cur['token_unit']}).", ""]
    if cur["read"]["problems"]:
        lines += ["## Input problems (skipped records; good records around them were kept)", "",
                  "| problem | count |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in cur["read"]["problems"].items()]
        lines += ["", "First problems:", "", "```", *cur["problems"][:30], "```", ""]
    lines += ["## Blocks", "", "| block | in | out | removed | changed |", "|---|---|---|---|---|"]
    for block, b in cur["blocks"].items():
        removed = ", ".join(f"{r}: {n}" for r, n in b["removed"].items()) or "-"
        changed = ", ".join(f"{r}: {n}" for r, n in b["changed"].items()) or "-"
        lines.append(f"| {block} | {b['in']} | {b['out']} | {removed} | {changed} |")
    lines += ["", "## Output", "", "| language | documents | tokens |", "|---|---|---|"]
    lines += [f"| {k} | {cur['documents_per_language'].get(k, 0)} | {v} |" for k, v in cur["tokens_per_language"].items()]
    lines += ["", "| source | documents | tokens | realized share | target share |", "|---|---|---|---|---|"]
    for k, v in cur["tokens_per_source"].items():
        target = cur["mixture"]["target"].get(k)
        lines.append(f"| {k} | {cur['documents_per_source'].get(k, 0)} | {v} | {cur['mixture']['realized'][k]:.3f} | "
                     f"{'-' if target is None else f'{target:.3f}'} |")
    lines += [""] + [f"![{p}]({p})" for p in plots] + [""]
    samples = [s for block in BLOCK_ORDER for s in read_samples(paths.work, block)]
    if samples:
        lines += ["## Samples of removed documents, per rule", ""]
        by_rule: dict[str, list[dict]] = {}
        for s in samples:
            by_rule.setdefault(f"{s['block']}/{s['reason']}", []).append(s)
        for rule, rows in by_rule.items():
            lines += [f"### {rule}", ""]
            for s in rows[:config.samples_per_reason]:
                text = s["text"].replace("\n", " ⏎ ")
                lines.append(f"- `{s['id']}` ({s['num_chars']} chars): {text[:300]}")
            lines.append("")
    path = paths.output / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def finalize(config: CurateConfig, paths: Paths) -> tuple[DatasetManifest, Path]:
    counts = collect(paths)
    manifest = build_manifest(config, paths, counts)
    manifest.save(paths.output / "manifest.json")
    plots = write_plots(paths, counts)
    return manifest, write_report(config, paths, manifest, plots)
