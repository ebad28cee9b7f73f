"""End to end: `curate()` on a messy two-source corpus (English + Chinese, planted duplicates, PII, bad records)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from lifecycle.data.curate.cli import curate
from lifecycle.data.curate.config import CurateConfig, DedupConfig, MixConfig
from lifecycle.data.curate.mixing import mixing_rates
from lifecycle.data.manifest import DatasetManifest


def output_records(out: Path) -> list[dict]:
    return [json.loads(line) for p in sorted((out / "data").glob("*.jsonl")) for line in p.read_text().splitlines()]


def run(corpus: dict, name: str = "out", **kwargs) -> tuple[DatasetManifest, Path]:
    config = CurateConfig(inputs=tuple(corpus["inputs"]), output_dir=str(corpus["root"] / name), **kwargs)
    manifest, report = curate(config, show_progress=False)
    return manifest, report


def test_messy_corpus_end_to_end(messy_corpus):
    manifest, report = run(messy_corpus, workers=2)
    out = report.parent
    records = output_records(out)
    ids = {r["id"] for r in records}
    cur = manifest.extra["curate"]

    # bad input: counted and reported with file and line, and the good records next to them kept
    problems = "\n".join(cur["problems"])
    for where in messy_corpus["bad_lines"]:
        assert where in problems
    # junk.txt: 4 x bytes 0..255 splits at each \n into 5 "lines": the first holds NUL, the rest bad UTF-8
    assert cur["read"]["problems"] == {"invalid JSON": 1, 'no "text" field': 1, "invalid UTF-8": 1 + 4,
                                       "binary data": 1, "empty file": 1}
    assert messy_corpus["next_to_bad"] <= ids

    # duplicates: the planted copies go, their originals stay
    assert not (messy_corpus["near"] | messy_corpus["exact"]) & ids
    assert messy_corpus["near_originals"] <= ids
    assert cur["blocks"]["dedup_near"]["removed"] == {"near_duplicate": 2}
    assert cur["blocks"]["dedup_exact"]["removed"] == {"exact_duplicate": 1}

    # PII scrubbed, counted per type
    text = "\n".join(r["text"] for r in records)
    assert "jane.doe@example.org" not in text and "13812345678" not in text and "<EMAIL>" in text
    assert cur["blocks"]["pii"]["changed"] == {"email": 2, "phone": 2}

    # counts add up: read -> every block -> output, and in = out + removed within each block
    assert cur["blocks"]["langid"]["in"] == cur["read"]["documents"] == 40 + 2 + 40 + 1
    previous_out = None
    for name, block in cur["blocks"].items():
        assert block["in"] == block["out"] + sum(block["removed"].values()), name
        if previous_out is not None:
            assert block["in"] == previous_out, name
        previous_out = block["out"]
    assert manifest.num_documents == len(records) == previous_out
    assert sum(cur["tokens_per_language"].values()) == manifest.num_tokens == sum(cur["tokens_per_source"].values())
    assert set(cur["documents_per_language"]) == {"en", "zh"} and set(cur["tokens_per_source"]) == {"en", "zh"}
    assert sum(manifest.removed.values()) == cur["read"]["documents"] - manifest.num_documents

    # the manifest round-trips, names inputs with hashes and outputs with hashes; the report has plots and samples
    loaded = DatasetManifest.load(out / "manifest.json")
    assert loaded.content_hash() == manifest.content_hash()
    assert {Path(s.path).name for s in loaded.sources} == {"part1.jsonl", "empty.jsonl", "junk.txt"}
    assert all(len(o["sha256"]) == 64 for o in cur["outputs"]) and cur["outputs"]
    md = report.read_text()
    for png in ("lengths.png", "languages.png", "removals.png"):
        assert (out / png).stat().st_size > 1000 and png in md
    assert "### dedup_near/near_duplicate" in md and "## Input problems" in md


def test_resume_skips_finished_stages(messy_corpus):
    from lifecycle.data.curate.pipeline import quiet_datatrove, run_pipeline
    from lifecycle.data.curate.report import finalize
    from lifecycle.data.curate.shards import source_names

    quiet_datatrove()
    config = CurateConfig(inputs=tuple(messy_corpus["inputs"]), output_dir=str(messy_corpus["root"] / "r"))
    files = source_names(config.inputs)
    paths = run_pipeline(config, files, show_progress=False, stop_after="near_sig")  # "interrupted" here
    assert not (paths.output / "data").exists()
    shard = paths.filtered / "00000.jsonl.gz"
    before = shard.stat().st_mtime_ns
    run_pipeline(config, files, show_progress=False)  # the same run again: finishes, redoes nothing
    assert shard.stat().st_mtime_ns == before
    resumed, _ = finalize(config, paths)
    fresh, _ = run(messy_corpus, "fresh")
    assert resumed.num_documents == fresh.num_documents
    assert {o["sha256"] for o in resumed.extra["curate"]["outputs"]} == \
        {o["sha256"] for o in fresh.extra["curate"]["outputs"]}
    with pytest.raises(Exception, match="another configuration"):
        run_pipeline(CurateConfig(inputs=config.inputs, output_dir=config.output_dir, workers=2), files)


def test_mixing_rates_follow_weights():
    assert mixing_rates({"a": 300, "b": 100}, {"a": 1, "b": 1}) == {"a": pytest.approx(1 / 3), "b": 1.0}
    assert mixing_rates({"a": 300, "b": 100}, {"a": 3, "b": 1}) == {"a": 1.0, "b": 1.0}
    assert mixing_rates({"a": 10}, {}) == {"a": 1.0}
    with pytest.raises(Exception, match="no weight"):
        mixing_rates({"a": 1, "b": 1}, {"a": 1})


def test_mixture_realized_shares_are_reported(messy_corpus):
    manifest, _ = run(messy_corpus, "mix", mix=MixConfig(weights={"en": 0.3, "zh": 0.7}),
                      dedup=DedupConfig(near=False))
    mixture = manifest.extra["curate"]["mixture"]
    assert mixture["target"] == {"en": pytest.approx(0.3), "zh": pytest.approx(0.7)}
    # whole documents are kept or dropped, so the share is approximate on 40 documents a source
    assert mixture["realized"]["en"] == pytest.approx(0.3, abs=0.08)
    assert manifest.extra["curate"]["blocks"]["mix"]["removed"]


def test_a_killed_task_is_redone_and_finished_ones_are_not(messy_corpus, monkeypatch):
    """Rank 0 of 3 in the filter stage dies half-way (a crash inside a block); the rerun redoes only that rank.
    Files go to ranks contiguously by bytes (shards.plan_parts; all under split_bytes, so read whole): rank 0 reads
    en/empty.jsonl + en/part1.jsonl, rank 1 zh/junk.txt, rank 2 zh/part1.jsonl."""
    from lifecycle.data.curate import pii
    from lifecycle.data.curate.pipeline import quiet_datatrove, run_pipeline
    from lifecycle.data.curate.report import finalize
    from lifecycle.data.curate.shards import source_names

    quiet_datatrove()
    crash_marker = messy_corpus["root"] / "crash-once"
    crash_marker.write_text("")
    original = pii.Pii.process

    def flaky(self, doc):
        if "/en/" in doc.id and doc.id.endswith(":30") and crash_marker.exists():
            crash_marker.unlink()
            # let ranks 1 and 2 complete first (datatrove's completion markers): the pool is torn down when a
            # task fails, and this test is about what a rerun does with finished and unfinished ranks
            done = messy_corpus["root"] / "k" / "work" / "logs" / "filter" / "completions"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not all((done / f"{r:05d}").exists() for r in (1, 2)):
                time.sleep(0.2)
            raise RuntimeError("simulated crash")
        return original(self, doc)

    monkeypatch.setattr(pii.Pii, "process", flaky)
    config = CurateConfig(inputs=tuple(messy_corpus["inputs"]), output_dir=str(messy_corpus["root"] / "k"), workers=3)
    files = source_names(config.inputs)
    with pytest.raises(Exception):
        run_pipeline(config, files, show_progress=False)
    paths_filtered = messy_corpus["root"] / "k" / "work" / "filtered"
    finished = {p.name: p.stat().st_mtime_ns for p in paths_filtered.glob("*.jsonl.gz")}
    assert sorted(finished) == ["00001.jsonl.gz", "00002.jsonl.gz"]  # rank 0 died before writing its shard
    paths = run_pipeline(config, files, show_progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in paths_filtered.glob("*.jsonl.gz") if p.name in finished} == finished
    resumed, _ = finalize(config, paths)
    fresh, _ = run(messy_corpus, "fresh2", workers=3)
    assert resumed.num_documents == fresh.num_documents
    assert resumed.extra["curate"]["blocks"] == fresh.extra["curate"]["blocks"]
