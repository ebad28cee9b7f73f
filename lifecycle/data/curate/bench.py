"""`lmforge bench curate`: the curation goals of issue 7, measured on ../shared/data; JSON + markdown.

Parts (`--parts`, all by default):
- dedup: near-duplicate precision/recall (and exact) on WikiText-2 + Chinese text with planted
  duplicates (bench_data.dedup_corpus), through the real pipeline with only the dedup blocks on.
  A removed document is a true positive when it is a planted copy; anything else removed is a false
  positive. The sources' own exact and near repeats (bigram Jaccard >= 0.3, exact join) are dropped
  before planting, so that every duplicate in the corpus is a planted one.
- pii: recall per type on presidio-research's synthetic set (a detection counts when it overlaps the
  true span with the right type) and on a Chinese set built here; false positives per type on clean
  text (WikiText-2, Chinese text) that has no PII of these kinds.
- langid: accuracy on lingua's sentences (>= 50 characters) for en/zh/de/fr/es/ja/ru.
- throughput: documents and MB per CPU-second on one core for the default pipeline, next to the same rules
  built from datatrove's stock blocks only (its Gopher/C4/FineWeb filters, PIIFormatter, MinHash with word
  5-grams, exact dedup; no language id: datatrove's needs a fastText download), both in one process,
  interleaved over `--rounds` rounds, medians of time.process_time (robust to other processes' load).
- memory: peak memory of the whole process tree (sampled from /proc: summed RSS, summed anonymous RSS,
  largest process), MB/s, MB/s per core, docs/s and the output counts of the default pipeline on generated
  inputs (bench_data.scale_corpus) of `--memory-small-mb` (default `--memory-mb` / 4) and `--memory-mb` MB,
  `--workers` processes, in a child process (run it under `nice`; inputs and outputs are deleted after).
Accuracy parts do not depend on machine load; throughput and memory do (run them on a quiet machine).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from lifecycle.data.manifest import atomic_write_text
from lifecycle.errors import ConfigError

PARTS = ("dedup", "pii", "langid", "throughput", "memory")


def bench_dedup(root: Path, work: Path, max_docs: int | None = None) -> dict[str, Any]:
    from lifecycle.data.curate.bench_data import dedup_corpus
    from lifecycle.data.curate.cli import curate
    from lifecycle.data.curate.config import (CleanConfig, CurateConfig, LangIdConfig, PiiConfig, QualityConfig)

    truth = dedup_corpus(root, work / "dedup_in", max_docs_per_language=max_docs)
    config = CurateConfig(inputs=(str(work / "dedup_in"),), output_dir=str(work / "dedup_out"),
                          langid=LangIdConfig(enabled=False), clean=CleanConfig(enabled=False),
                          quality=QualityConfig(enabled=False), pii=PiiConfig(enabled=False))
    manifest, _ = curate(config, show_progress=False)
    kept = {json.loads(line)["id"] for p in (work / "dedup_out" / "data").glob("*.jsonl")
            for line in p.read_text(encoding="utf-8").splitlines()}
    read = manifest.extra["curate"]["read"]["documents"]
    near, exact = set(truth["near"]), set(truth["exact"])
    all_ids = {f"{work / 'dedup_in' / name}:{i}" for name, n in _line_counts(work / "dedup_in").items()
               for i in range(1, n + 1)}
    removed = all_ids - kept
    planted = near | exact
    tp = len(removed & planted)
    return {"documents": read, "originals": truth["num_originals"], "planted_near": len(near),
            "planted_exact": len(exact), "removed": len(removed),
            "recall_near": len(removed & near) / max(len(near), 1),
            "recall_exact": len(removed & exact) / max(len(exact), 1),
            "precision": tp / max(len(removed), 1), "false_positives": len(removed - planted),
            "edit_fraction_range": [min(truth["edit_fractions"]), max(truth["edit_fractions"])],
            "natural_near_duplicates_dropped_before_planting": truth["natural_near_duplicates_dropped"],
            "config": manifest.extra["curate"]["config"]["dedup"]}


def _line_counts(folder: Path) -> dict[str, int]:
    return {p.name: sum(1 for _ in p.open(encoding="utf-8")) for p in sorted(folder.glob("*.jsonl"))}


def bench_pii(root: Path) -> dict[str, Any]:
    from lifecycle.data.curate.bench_data import (PRESIDIO_TYPES, chinese_pii_set, chinese_texts, presidio_records,
                                                  wikitext_paragraphs)
    from lifecycle.data.curate.pii import find_pii

    hits, totals = Counter(), Counter()
    for record in presidio_records(root):
        found = find_pii(record["full_text"])
        for span in record["spans"]:
            kind = PRESIDIO_TYPES.get(span["entity_type"])
            if kind is None:
                continue
            totals[kind] += 1
            s, e = span["start_position"], span["end_position"]
            hits[kind] += any(k == kind and a < e and s < b for a, b, k in found)
    zh_hits, zh_totals = Counter(), Counter()
    for text, values in chinese_pii_set():
        found = find_pii(text)
        for kind, value in values:
            zh_totals[kind] += 1
            start = text.index(value)
            zh_hits[kind] += any(k == kind and a < start + len(value) and start < b for a, b, k in found)
    clean = wikitext_paragraphs(root, min_chars=1) + chinese_texts(root, min_chars=1)
    false_pos = Counter(k for text in clean for _, _, k in find_pii(text))
    clean_mb = sum(len(t.encode("utf-8")) for t in clean) / 1e6
    return {"presidio_recall": {k: hits[k] / totals[k] for k in sorted(totals)}, "presidio_counts": dict(totals),
            "chinese_recall": {k: zh_hits[k] / zh_totals[k] for k in sorted(zh_totals)},
            "chinese_counts": dict(zh_totals),
            "clean_text_false_positives": dict(false_pos), "clean_text_mb": round(clean_mb, 2)}


def bench_langid(root: Path) -> dict[str, Any]:
    from lifecycle.data.curate.bench_data import langid_sentences
    from lifecycle.data.curate.config import LangIdConfig
    from lifecycle.data.curate.langid import LanguageId

    block = LanguageId(LangIdConfig(), ".")
    block.setup()
    right, total = Counter(), Counter()
    for lang, text in langid_sentences(root):
        predicted, _, _ = block.detect(text)
        total[lang] += 1
        right[lang] += predicted == lang
    return {"accuracy": sum(right.values()) / sum(total.values()),
            "per_language": {k: right[k] / total[k] for k in sorted(total)}, "sentences": dict(total),
            "candidates": list(LangIdConfig().candidates)}


def bench_throughput(root: Path, work: Path, max_docs: int | None = None, rounds: int = 3) -> dict[str, Any]:
    """Both pipelines in this process on the same input, interleaved (round r runs lmforge then stock, or stock
    then lmforge when r is odd), timed with time.process_time: this process's CPU seconds, which other
    processes' load hardly moves (wall seconds are reported too, and do move). One worker, so datatrove's
    executor runs every task in this process. Imports and lingua's models are loaded before the first round.
    Each leg starts with a cold spaCy tokenizer (datatrove caches one per language per process, and our
    quality block warms the one it is handed: left shared, the stock leg would inherit our warm-up)."""
    import shutil
    import statistics

    from datatrove.utils.word_tokenizers import load_word_tokenizer

    from lifecycle.data.curate.bench_data import chinese_texts, wikitext_paragraphs
    from lifecycle.data.curate.cli import curate
    from lifecycle.data.curate.config import CurateConfig

    every = wikitext_paragraphs(root, min_chars=1) + chinese_texts(root, min_chars=1)
    docs = every[:max_docs] if max_docs else every
    src = work / "tp_in" / "corpus.jsonl"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs), encoding="utf-8")
    mb = src.stat().st_size / 1e6
    warm = work / "tp_warm.jsonl"  # imports, lingua's models, matplotlib: once, untimed
    warm.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in
                    [d for d in every if len(d) > 1000][:40]), encoding="utf-8")  # long: stock's filters keep some
    curate(CurateConfig(inputs=(str(warm),), output_dir=str(work / "tp_warm_ours")), show_progress=False)
    _stock_pipeline(warm, work / "tp_warm_stock")
    legs = {"lmforge": lambda out: curate(CurateConfig(inputs=(str(src),), output_dir=str(out)), show_progress=False),
            "datatrove_stock": lambda out: _stock_pipeline(src, out)}
    cpu: dict[str, list[float]] = {name: [] for name in legs}
    wall: dict[str, list[float]] = {name: [] for name in legs}
    for r in range(rounds):
        for name in (list(legs) if r % 2 == 0 else list(reversed(legs))):
            out = work / f"tp_{name}_{r}"
            load_word_tokenizer.cache_clear()
            c0, w0 = time.process_time(), time.perf_counter()
            legs[name](out)
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
            shutil.rmtree(out)
    ratios = [s / o for s, o in zip(cpu["datatrove_stock"], cpu["lmforge"])]  # lmforge's speed / stock's
    result: dict[str, Any] = {"documents": len(docs), "mb": round(mb, 3), "workers": 1, "rounds": rounds,
                              "speed_ratio_per_round": [round(x, 3) for x in ratios],
                              "speed_ratio_median": round(statistics.median(ratios), 3)}
    for name in legs:
        c, w = statistics.median(cpu[name]), statistics.median(wall[name])
        result[name] = {"cpu_seconds": [round(x, 2) for x in cpu[name]], "wall_seconds": [round(x, 2) for x in wall[name]],
                        "docs_per_cpu_s": round(len(docs) / c, 1), "mb_per_cpu_s": round(mb / c, 4),
                        "docs_per_s": round(len(docs) / w, 1), "mb_per_s": round(mb / w, 4)}
    return result


def _stock_pipeline(src: Path, out: Path) -> None:
    """The same rules from datatrove's own blocks only, one task, stages run one after the other."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.exact_dedup import (ExactDedupConfig, ExactDedupFilter, ExactDedupSignature,
                                                      ExactFindDedups)
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter)
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from lifecycle.data.curate.dedup import normalized_text

    exact = ExactDedupConfig(content_getter=normalized_text)
    mh = MinhashConfig()
    stages = [
        [JsonlReader(str(src.parent), glob_pattern=src.name), GopherQualityFilter(), GopherRepetitionFilter(),
         C4QualityFilter(), FineWebQualityFilter(), PIIFormatter(), JsonlWriter(str(out / "filtered")),
         ExactDedupSignature(str(out / "esig"), exact)],
        [ExactFindDedups(str(out / "esig"), str(out / "edup"), exact)],
        [JsonlReader(str(out / "filtered")), ExactDedupFilter(str(out / "edup"), exact),
         JsonlWriter(str(out / "exact")), MinhashDedupSignature(str(out / "msig"), mh)],
        "buckets",
        [MinhashDedupCluster(str(out / "mbuck"), str(out / "mrem"), mh)],
        [JsonlReader(str(out / "exact")), MinhashDedupFilter(str(out / "mrem")), JsonlWriter(str(out / "final"))],
    ]
    for i, stage in enumerate(stages):
        tasks = 1
        if stage == "buckets":
            stage, tasks = [MinhashDedupBuckets(str(out / "msig"), str(out / "mbuck"), config=mh)], mh.num_buckets
        LocalPipelineExecutor(stage, tasks=tasks, workers=1, logging_dir=str(out / "logs" / str(i))).run()
        if i in (0, 2) and not any((out / ("filtered" if i == 0 else "exact")).glob("*.jsonl*")):
            return  # the filters kept nothing: datatrove's readers refuse an empty folder


def _run_measured(src: Path, out: Path, workers: int, extra: tuple[str, ...] = (),
                  memory_limit_mb: float | None = None) -> dict[str, Any]:
    """`lmforge curate run src -o out --workers N` in a child process, its process tree's memory sampled
    (rss.TreeSampler) while it runs; also the child's own peak (VmHWM) and the largest reaped worker's
    (RUSAGE_CHILDREN ru_maxrss), and the wall seconds. With `memory_limit_mb` the child runs in a memory cgroup with
    that hard limit (cgroup.MemoryCgroup): its exact peak (anonymous + page cache) and OOM kills."""
    import contextlib

    from lifecycle.data.curate.cgroup import MemoryCgroup
    from lifecycle.data.curate.rss import TreeSampler

    # The child's own peak is its VmHWM, not ru_maxrss(RUSAGE_SELF): Linux carries the high-water mark of the
    # address space a process had before exec into its ru_maxrss, and that was a copy of this (possibly much
    # larger: a test runner after an engine benchmark, 4.9 GB) process. VmHWM belongs to the exec'd image.
    code = ("import resource, sys; from lifecycle.cli import main; rc = main(sys.argv[1:]); "
            "hwm = next(int(ln.split()[1]) for ln in open('/proc/self/status') if ln.startswith('VmHWM:')); "
            "print('PEAK', hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
    limit = MemoryCgroup(memory_limit_mb) if memory_limit_mb else None
    with limit or contextlib.nullcontext():
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", code, "curate", "run", str(src), "-o", str(out),
                                 "--workers", str(workers), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, preexec_fn=limit.add_self if limit else None)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        stdout, stderr = proc.communicate()
        tree = sampler.stop()
        seconds = time.perf_counter() - start
        cgroup = limit.stats() if limit else None
    if cgroup and cgroup["oom_kills"]:
        raise ConfigError(f"memory run killed by its memory limit ({cgroup}); exit {proc.returncode}: "
                          f"{stderr[-2000:]}")
    if proc.returncode:
        raise ConfigError(f"memory run failed: {stderr[-2000:]}")
    main_kb, worker_kb = map(int, next(ln for ln in stdout.splitlines() if ln.startswith("PEAK")).split()[1:])
    # both in KiB
    return {"main_mb": round(main_kb / 1024, 1), "largest_worker_mb": round(worker_kb / 1024, 1),
            "peak_mb": round(max(main_kb, worker_kb) / 1024, 1), "tree": tree, "seconds": seconds,
            **({"cgroup": cgroup} if cgroup else {})}


def _drop_all_page_cache() -> None:
    """sync, then echo 1 > /proc/sys/vm/drop_caches (clean page cache only; needs root)."""
    import os

    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1")
    except OSError as exc:
        raise ConfigError(f"--drop-caches: cannot write /proc/sys/vm/drop_caches ({exc.strerror}); run as root "
                          "or leave it out") from exc


def _drop_from_page_cache(path: Path) -> None:
    """Write `path` back and ask the kernel to drop its cached pages (posix_fadvise DONTNEED)."""
    import os

    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _outcome(out: Path) -> dict[str, Any]:
    """What the run read, wrote and removed (per block/reason), from its manifest."""
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    return {"read": manifest["extra"]["curate"]["read"]["documents"], "written": manifest["num_documents"],
            "removed": manifest.get("removed", {})}


def _dir_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6, 1)


def bench_memory(root: Path, work: Path, size_mb: float, workers: int = 1, small_mb: float | None = None,
                 curate_args: tuple[str, ...] = (), memory_limit_mb: float | None = None,
                 drop_caches: bool = False) -> dict[str, Any]:
    """Peak memory and speed of the default pipeline on a generated input of `small_mb` (default size_mb / 4)
    and of `size_mb` MB (bench_data.scale_corpus: English and Chinese, planted near and exact duplicates; one
    file, cut into byte ranges for several workers). Bounded memory means the larger run's peak is not larger
    by anything like the extra input. MB/s per core is MB/s / workers (wall-clock: it depends on load).
    Each input and output is deleted once measured (a multi-GB run leaves nothing behind). `curate_args` are
    added to the `lmforge curate run` command line (e.g. --disable langid --task-mb 128). `memory_limit_mb`
    runs both in a memory cgroup with that hard limit (set it below `size_mb`: an input larger than the RAM
    the run may use); the run fails if the kernel has to OOM-kill anything. `drop_caches` empties the kernel's
    page cache before each run (root; system-wide), so both start cold and a cgroup is charged for every file
    its run reads, the libraries' and models' included (else the first run pays for them and the second not)."""
    import shutil

    from lifecycle.data.curate.bench_data import scale_corpus

    result: dict[str, Any] = {"workers": workers, "curate_args": list(curate_args),
                              "memory_limit_mb": memory_limit_mb, "drop_caches": drop_caches}
    small = small_mb if small_mb is not None else max(1.0, size_mb / 4)
    for label, mb in (("small", small), ("large", size_mb)):
        src, out = work / f"mem_{label}" / "input.jsonl", work / f"mem_{label}_out"
        start = time.perf_counter()
        generated = scale_corpus(root, src, mb)
        generate_s = time.perf_counter() - start
        input_mb, docs = src.stat().st_size / 1e6, generated["documents"]
        src_dir = src.parent
        if drop_caches:
            _drop_all_page_cache()
        elif memory_limit_mb:  # the input's pages were cached (and charged) by this process: the run must read it
            _drop_from_page_cache(src)  # from disk into its own cgroup, or the limit would not cover it
        rss = _run_measured(src, out, workers, curate_args, memory_limit_mb)
        seconds = rss.pop("seconds")
        result[label] = {"input_mb": round(input_mb, 1), "documents": docs, "generated": generated,
                         "generate_seconds": round(generate_s, 1), "peak_rss_mb": rss["peak_mb"],
                         "tree_rss_mb": rss["tree"]["rss_mb"], "tree_anon_mb": rss["tree"]["anon_mb"],
                         "tree_pss_mb": rss["tree"]["pss_mb"], "cgroup": rss.pop("cgroup", None), "rss": rss,
                         "seconds": round(seconds, 1), "mb_per_s": round(input_mb / seconds, 3),
                         "mb_per_s_per_core": round(input_mb / seconds / workers, 3),
                         "docs_per_s": round(docs / seconds, 1), "outcome": _outcome(out),
                         "disk_mb": {"output": _dir_mb(out) - _dir_mb(out / "work"), "work": _dir_mb(out / "work")}}
        shutil.rmtree(src_dir)  # a multi-GB input and its outputs need not stay on disk
        shutil.rmtree(out)
    for key in ("peak_rss_mb", "tree_rss_mb", "tree_anon_mb", "tree_pss_mb"):
        result[f"{key.removesuffix('_mb')}_growth_mb"] = round(result["large"][key] - result["small"][key], 1)
    result["rss_growth_mb"] = result["peak_rss_growth_mb"]
    result["input_growth_mb"] = round(result["large"]["input_mb"] - result["small"]["input_mb"], 1)
    return result


def run_bench(data_root: str, output: str, parts: tuple[str, ...] = PARTS, memory_mb: float = 100,
              max_docs: int | None = None, workers: int = 1, memory_small_mb: float | None = None,
              work_dir: str | None = None, rounds: int = 3, curate_args: tuple[str, ...] = (),
              memory_limit_mb: float | None = None, drop_caches: bool = False) -> dict[str, Any]:
    from lifecycle.data.curate.pipeline import quiet_datatrove

    root = Path(data_root)
    if not (root / "MANIFEST.md").is_file():
        raise ConfigError(f"--data-root {root}: not ../shared/data (no MANIFEST.md there)")
    if unknown := sorted(set(parts) - set(PARTS)):
        raise ConfigError(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    quiet_datatrove()
    result: dict[str, Any] = {"machine": {"python": platform.python_version(), "cpu": platform.processor(),
                                          "platform": platform.platform()}}
    if work_dir:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-curate-", dir=work_dir) as tmp:
        work = Path(tmp)
        for part in parts:
            start = time.perf_counter()
            if part == "dedup":
                result["dedup"] = bench_dedup(root, work, max_docs)
            elif part == "pii":
                result["pii"] = bench_pii(root)
            elif part == "langid":
                result["langid"] = bench_langid(root)
            elif part == "throughput":
                result["throughput"] = bench_throughput(root, work, max_docs, rounds)
            elif part == "memory":
                result["memory"] = bench_memory(root, work, memory_mb, workers, memory_small_mb,
                                                curate_args, memory_limit_mb, drop_caches)
            result.setdefault("seconds", {})[part] = round(time.perf_counter() - start, 1)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), to_markdown(result))
    return result


def to_markdown(r: dict[str, Any]) -> str:
    lines = ["# lmforge bench curate", ""]
    if d := r.get("dedup"):
        lines += ["## Deduplication (WikiText-2 + Chinese, planted duplicates)", "",
                  f"{d['documents']} documents ({d['originals']} originals, {d['planted_near']} near copies with "
                  f"{d['edit_fraction_range'][0]:.0%}-{d['edit_fraction_range'][1]:.0%} edits, {d['planted_exact']} "
                  "exact copies).", "", "| near recall | exact recall | precision | false positives |",
                  "|---|---|---|---|",
                  f"| {d['recall_near']:.4f} | {d['recall_exact']:.4f} | {d['precision']:.4f} | {d['false_positives']} |",
                  ""]
    if p := r.get("pii"):
        lines += ["## PII recall", "", "| type | presidio-research | Chinese set | false positives on clean text |",
                  "|---|---|---|---|"]
        for k in sorted(set(p["presidio_recall"]) | set(p["chinese_recall"])):
            cells = []
            for recall, counts in (("presidio_recall", "presidio_counts"), ("chinese_recall", "chinese_counts")):
                value = p[recall].get(k)
                cells.append("-" if value is None else f"{value:.3f} ({p[counts][k]})")
            fp = p["clean_text_false_positives"].get(k, 0)
            lines.append(f"| {k} | {cells[0]} | {cells[1]} | {fp} in {p['clean_text_mb']} MB |")
        lines.append("")
    if lg := r.get("langid"):
        lines += ["## Language id (lingua sentences >= 50 chars)", "", f"accuracy {lg['accuracy']:.4f}", "",
                  "| language | accuracy | sentences |", "|---|---|---|"]
        lines += [f"| {k} | {v:.4f} | {lg['sentences'][k]} |" for k, v in lg["per_language"].items()]
        lines.append("")
    if t := r.get("throughput"):
        lines += [f"## Throughput (1 worker, one process, {t['rounds']} interleaved rounds, medians)", "",
                  "| pipeline | docs per CPU-s | MB per CPU-s | CPU s per round | docs/s (wall) |", "|---|---|---|---|---|"]
        for name in ("lmforge", "datatrove_stock"):
            v = t[name]
            lines.append(f"| {name} | {v['docs_per_cpu_s']} | {v['mb_per_cpu_s']} | {v['cpu_seconds']} | "
                         f"{v['docs_per_s']} |")
        lines += ["", f"lmforge / stock speed (CPU time): {t['speed_ratio_median']} (rounds: "
                  f"{t['speed_ratio_per_round']})", ""]
    if m := r.get("memory"):
        lines += [f"## Memory and speed ({' '.join(m.get('curate_args', [])) or 'default pipeline'}, {m['workers']} "
                  "worker(s), one input file)", "",
                  "| input | documents | peak tree PSS | tree RSS (anon) | largest process | MB/s | MB/s per core | docs/s "
                  "| written | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {v['input_mb']} MB | {v['documents']} | {v['tree_pss_mb']} MB | {v['tree_rss_mb']} MB ({v['tree_anon_mb']} MB) | "
                  f"{v['rss']['tree']['largest_process_mb']} MB | {v['mb_per_s']} | {v['mb_per_s_per_core']} | "
                  f"{v['docs_per_s']} | {v['outcome']['written']} | {v['seconds']} |" for v in (m["small"], m["large"])]
        for label in ("small", "large"):
            if c := m[label].get("cgroup"):
                lines.append(f"{m[label]['input_mb']} MB input under a {c['limit_mb']} MB cgroup limit (cgroup v"
                             f"{c['cgroup_version']}): peak {c['peak_mb']} MB (anonymous + page cache), "
                             f"{c['oom_kills']} OOM kills.")
        lines += ["", f"Peak tree PSS grew {m['tree_pss_growth_mb']} MB, RSS {m['tree_rss_growth_mb']} MB (anonymous {m['tree_anon_growth_mb']} MB) for "
                  f"{m['input_growth_mb']} MB more input.", ""]
    return "\n".join(lines)


def add_bench_action(actions: Any) -> None:
    """`lmforge bench curate`, added to the `bench` group by lifecycle/bench.py."""
    from lifecycle.cli import add_subcommand

    parser = add_subcommand(actions, "curate", help="curation goals: near-dup P/R, PII recall, langid accuracy, "
                            "throughput vs stock datatrove, peak memory",
                            example="lmforge bench curate --data-root ../shared/data --parts dedup,pii,langid")
    parser.add_argument("--data-root", default="../shared/data", help="the shared datasets (default ../shared/data)")
    parser.add_argument("--output", default="runs/bench/curate.json", help="JSON report (markdown beside it)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--memory-mb", type=float, default=100, help="size (MB) of the generated input for the memory "
                        "part (bench_data.scale_corpus: en + zh with planted duplicates; never kept)")
    parser.add_argument("--memory-small-mb", type=float, help="size (MB) of the smaller input it is compared with "
                        "(default: --memory-mb / 4)")
    parser.add_argument("--curate-arg", action="append", default=[], help="memory part: an argument added to its "
                        "`lmforge curate run` (repeatable; e.g. --curate-arg=--disable --curate-arg=langid)")
    parser.add_argument("--memory-limit-mb", type=float, help="memory part: run each curation in a memory cgroup "
                        "with this hard limit (anonymous memory + page cache; needs a writable cgroup fs); below "
                        "--memory-mb it shows an input larger than the run's RAM; fails on any OOM kill")
    parser.add_argument("--drop-caches", action="store_true", help="memory part: sync and empty the kernel's page "
                        "cache before each run (root, system-wide), so every run starts cold")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the throughput part")
    parser.add_argument("--work-dir", help="where the generated inputs and runs go (default: the system temp "
                        "dir); removed afterwards")
    parser.add_argument("--max-docs", type=int, help="cap documents per language (quick runs)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes for the memory part (its MB/s per "
                        "core divides by this)")

    def _run(args: Any) -> int:
        from lifecycle.data.manifest import check_output_file

        check_output_file(args.output)  # before parts that can take hours
        result = run_bench(args.data_root, args.output, tuple(p for p in args.parts.split(",") if p),
                           args.memory_mb, args.max_docs, args.workers, args.memory_small_mb, args.work_dir,
                           args.rounds, tuple(args.curate_arg), args.memory_limit_mb, args.drop_caches)
        print(to_markdown(result))
        print(f"wrote {args.output}")
        return 0

    parser.set_defaults(func=_run)
