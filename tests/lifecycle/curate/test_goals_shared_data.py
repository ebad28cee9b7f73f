"""The issue's accuracy goals on the real data in ../shared/data, on subsets small enough for the suite
(`lmforge bench curate` runs the full sets)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.shared_data


def test_langid_accuracy_on_lingua_sentences(shared_data):
    from lifecycle.data.curate.bench_data import langid_sentences
    from lifecycle.data.curate.config import LangIdConfig
    from lifecycle.data.curate.langid import LanguageId

    block = LanguageId(LangIdConfig(), ".")
    block.setup()
    by_lang: dict[str, list[str]] = {}
    for lang, text in langid_sentences(shared_data):
        by_lang.setdefault(lang, []).append(text)
    pairs = [(lang, t) for lang, texts in by_lang.items() for t in texts[:80]]
    accuracy = sum(block.detect(t)[0] == lang for lang, t in pairs) / len(pairs)
    assert len(by_lang) == 7 and accuracy >= 0.98


def test_pii_recall_on_presidio_and_chinese_sets(shared_data):
    from lifecycle.data.curate.bench import bench_pii

    result = bench_pii(shared_data)
    for kind, recall in {**result["presidio_recall"], **result["chinese_recall"]}.items():
        assert recall >= 0.95, (kind, recall)
    assert set(result["chinese_recall"]) == {"email", "phone", "ip", "bank_card", "cn_id"}
    assert sum(result["clean_text_false_positives"].values()) <= 5


def test_near_duplicate_precision_and_recall(shared_data, tmp_path):
    from lifecycle.data.curate.bench import bench_dedup

    result = bench_dedup(shared_data, tmp_path, max_docs=400)
    assert result["planted_near"] >= 60
    assert result["recall_near"] >= 0.95 and result["recall_exact"] == 1.0 and result["precision"] >= 0.99


def test_bench_memory_reports_peak_rss_and_mb_per_s_per_core(shared_data, tmp_path):
    """`lmforge bench curate --parts memory --workers 2`: one generated file split over two workers; peak RSS of
    the main process and of the largest worker, MB/s and MB/s per core, for a 1 MB and a 2 MB input.

    Language id is off: its models (loaded once, before the workers fork) take 220-300 MB, a different amount in
    each process (measured: fresh processes loading the same twelve languages, 218-304 MB resident), so two runs' peaks
    differ by up to ~50 MB whatever the input; this compares the two runs, so the rest of the pipeline is what it
    measures. (It failed CI with langid on: 864 -> 897 MB main peak, 1 MB more input.) Language id's memory has its
    own test (test_langid_memory.py)."""
    from lifecycle.data.curate.bench import bench_memory, to_markdown

    result = bench_memory(shared_data, tmp_path, size_mb=2, workers=2, curate_args=("--disable", "langid"))
    small, large = result["small"], result["large"]
    why = json.dumps({k: v for k, v in result.items() if k not in ("small", "large")} | {
        label: {k: r[k] for k in ("rss", "tree_pss_mb", "tree_rss_mb", "seconds", "documents")}
        for label, r in (("small", small), ("large", large))}, default=str)  # printed when an assert fails
    assert small["input_mb"] == pytest.approx(1, abs=0.1) and large["input_mb"] == pytest.approx(2, abs=0.1)
    for run in (small, large):
        assert run["rss"]["main_mb"] > 50 and run["rss"]["largest_worker_mb"] > 50, why  # python + torch imported
        assert run["peak_rss_mb"] == max(run["rss"]["main_mb"], run["rss"]["largest_worker_mb"])
        assert run["mb_per_s_per_core"] == pytest.approx(run["mb_per_s"] / 2, abs=2e-3) and run["mb_per_s"] > 0
        # the whole tree: the run's main process and its two workers, sampled while they ran
        assert run["rss"]["tree"]["processes"] >= 3 and run["rss"]["tree"]["samples"] >= 2, why
        # sampled every 0.5 s, so it can miss a short peak that VmHWM (main_mb) saw: a floor, not a match
        assert 50 < run["rss"]["tree"]["largest_process_mb"] <= 1.05 * max(run["rss"]["main_mb"],
                                                                          run["rss"]["largest_worker_mb"]), why
        assert run["tree_rss_mb"] >= run["tree_pss_mb"] > run["rss"]["main_mb"] / 2, why
        assert run["outcome"]["read"] == run["documents"] == run["generated"]["documents"]
        assert run["outcome"]["written"] + sum(run["outcome"]["removed"].values()) == run["documents"]
    assert result["rss_growth_mb"] == pytest.approx(large["peak_rss_mb"] - small["peak_rss_mb"], abs=0.11)
    assert result["rss_growth_mb"] < 30, why  # 1 MB more input; the limit is loose: this is about the fields
    assert "MB/s per core" in to_markdown({"memory": result})


def test_bench_throughput_interleaves_both_pipelines_on_cpu_time(shared_data, tmp_path):
    """`--parts throughput`: both legs in one process, alternating order, CPU seconds per round and the median
    speed ratio (lmforge / stock) computed from them."""
    import statistics

    from lifecycle.data.curate.bench import bench_throughput, to_markdown

    result = bench_throughput(shared_data, tmp_path, max_docs=30, rounds=2)
    ours, stock = result["lmforge"], result["datatrove_stock"]
    assert len(ours["cpu_seconds"]) == len(stock["cpu_seconds"]) == 2 and min(ours["cpu_seconds"]) > 0
    ratios = [s / o for s, o in zip(stock["cpu_seconds"], ours["cpu_seconds"])]
    assert result["speed_ratio_per_round"] == pytest.approx(ratios, abs=0.01)
    assert result["speed_ratio_median"] == pytest.approx(statistics.median(ratios), abs=0.01)
    assert ours["docs_per_cpu_s"] == pytest.approx(30 / statistics.median(ours["cpu_seconds"]), rel=0.02)
    assert "lmforge / stock speed (CPU time)" in to_markdown({"throughput": result})
    assert not list(tmp_path.glob("tp_lmforge_*"))  # each leg's output is removed after it is timed
