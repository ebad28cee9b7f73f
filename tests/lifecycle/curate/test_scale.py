"""Scale: the spaCy warm-up keeps datatrove's tokens and verdicts, the MinHash cluster stage holds only the
duplicates, the process-tree memory sampler sees forked workers, and the multi-GB generator streams."""

from __future__ import annotations

import json
import os
import random
import time

import pytest
from datatrove.data import Document

from lifecycle.data.curate.config import QualityConfig
from lifecycle.data.curate.quality import Quality, SpacyWarmUp

from .conftest import english_doc


def test_spacy_warm_up_keeps_tokens_and_verdicts_and_stops_at_its_budget(tmp_path):
    from datatrove.utils.text import split_into_sentences, split_into_words
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    rng = random.Random(3)
    texts = [english_doc(rng, 10) for _ in range(20)] + ["Short one. Buy now!!! e-mail: x@y.com 3.5% U.S.A. don't"]
    load_word_tokenizer.cache_clear()  # a cold tokenizer, as a fresh worker has
    cold = [(split_into_words(t, "eng"), split_into_sentences(t, "eng")) for t in texts]
    cold_kept = [d.id for d in Quality(QualityConfig(), str(tmp_path / "a")).run(
        iter([Document(text=t, id=str(i), metadata={"language": "en"}) for i, t in enumerate(texts)]))]

    load_word_tokenizer.cache_clear()
    warm_up = SpacyWarmUp({"eng"}, budget=sum(map(len, texts[:5])))
    for t in texts:
        warm_up(t)
    assert warm_up.done == sum(map(len, texts[:5]))  # stopped at the budget
    nlp = load_word_tokenizer("eng").tokenizer
    assert nlp.vocab.strings[texts[0].split()[1]]  # a warmed word stays in the vocabulary
    assert [(split_into_words(t, "eng"), split_into_sentences(t, "eng")) for t in texts] == cold
    # the block itself, warming as it goes, keeps exactly what the cold filters kept
    load_word_tokenizer.cache_clear()
    warm_kept = [d.id for d in Quality(QualityConfig(), str(tmp_path / "b")).run(
        iter([Document(text=t, id=str(i), metadata={"language": "en"}) for i, t in enumerate(texts)]))]
    assert warm_kept == cold_kept and len(cold_kept) >= 10


def _write_dups(folder, pairs):
    import struct

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "00000.dups").write_bytes(b"".join(struct.pack("<4I", *p) for p in pairs))


def test_verified_cluster_keeps_only_duplicates_in_memory(tmp_path):
    """A candidate pair below the threshold is dropped without a trace; pairs repeated across bands are
    verified again, not remembered; clusters keep their earliest document."""
    import numpy as np

    from lifecycle.data.curate.config import DedupConfig
    from lifecycle.data.curate.dedup import VerifiedMinhashCluster

    cfg = DedupConfig(bands=2, rows=2, threshold=0.75)
    sigs = np.array([[1, 2, 3, 4], [1, 2, 3, 9], [7, 8, 9, 10], [1, 2, 3, 4], [5, 5, 5, 5]], dtype="<u2")
    (tmp_path / "sigs" / "full").mkdir(parents=True)
    sigs.tofile(tmp_path / "sigs" / "full" / "00000.sig")
    # 0~1 agree on 3/4, 1~3 on 3/4 (0~3 on 4/4: one cluster); 0~2 and 2~4 are candidates that fail (0/4)
    _write_dups(tmp_path / "buckets", [(0, 0, 0, 1), (0, 0, 0, 2), (0, 0, 0, 1), (0, 2, 0, 4), (0, 1, 0, 3)])
    stage = VerifiedMinhashCluster(str(tmp_path / "buckets"), str(tmp_path / "remove"), str(tmp_path / "sigs"), cfg)
    stage.run()
    removed = np.frombuffer((tmp_path / "remove" / "000000.remove").read_bytes(), dtype="<u4").tolist()
    assert removed == [1, 3]
    assert stage.stats["candidate_pairs"].total == 5 and stage.stats["verified_pairs"].total == 2


@pytest.mark.parametrize("pairs_per_batch", [1, 2, 1000])
def test_batched_sorted_reads_give_the_pair_at_a_time_clusters_and_counts(tmp_path, monkeypatch, pairs_per_batch):
    """The cluster stage reads a batch's signatures in file order; which pairs it verifies, what it counts and the
    clusters it makes are those of verifying one pair at a time (checked against a brute-force union-find)."""
    import random
    import struct

    import numpy as np

    from lifecycle.data.curate import dedup
    from lifecycle.data.curate.config import DedupConfig

    monkeypatch.setattr(dedup, "PAIRS_PER_BATCH", pairs_per_batch)
    rng = np.random.default_rng(0)
    num_docs = {0: 300, 1: 200}
    base = rng.integers(0, 4, size=(30, 8))  # 30 families: members agree with their family on most values
    docs = {(r, d): int(rng.integers(0, 30)) for r, n in num_docs.items() for d in range(n)}
    (tmp_path / "sigs" / "full").mkdir(parents=True)
    sig = {}
    for r, n in num_docs.items():
        rows = np.empty((n, 8), dtype="<u2")
        for d in range(n):
            rows[d] = base[docs[(r, d)]]
            rows[d, rng.integers(0, 8)] = rng.integers(100, 200)  # one value off: 6/8 or 7/8 agree within a family
            sig[(r, d)] = rows[d]
        rows.tofile(tmp_path / "sigs" / "full" / f"{r:05d}.sig")
    keys = list(docs)
    pairs = [tuple(random.Random(i).sample(keys, 2)) for i in range(3000)]
    (tmp_path / "buckets").mkdir()
    (tmp_path / "buckets" / "00000.dups").write_bytes(b"".join(struct.pack("<4I", *a, *b) for a, b in pairs))
    stage = dedup.VerifiedMinhashCluster(str(tmp_path / "buckets"), str(tmp_path / "remove"), str(tmp_path / "sigs"),
                                         DedupConfig(bands=2, rows=4, threshold=0.7))
    stage.run()
    # the reference: the same pairs, one at a time, straight from the arrays
    parent = {k: k for k in keys}

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x
    verified = 0
    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb and float(np.mean(sig[a] == sig[b])) >= 0.7:
            verified += 1
            parent[max(ra, rb)] = min(ra, rb)
    want = {r: sorted(d for (rr, d) in keys if rr == r and find((rr, d)) != (rr, d)) for r in num_docs}
    got = {r: np.frombuffer((tmp_path / "remove" / f"{r:06d}.remove").read_bytes(), dtype="<u4").tolist()
           for r in num_docs}
    assert got == want and sum(map(len, want.values())) > 50
    assert stage.stats["candidate_pairs"].total == len(pairs) and stage.stats["verified_pairs"].total == verified


def test_similarities_are_agreement_shares_and_zero_without_shingles():
    import numpy as np

    from lifecycle.data.curate.dedup import NO_SIGNATURE, similarities

    none = np.full(4, NO_SIGNATURE, dtype="<u2")
    a = np.array([[1, 2, 3, 4], [1, 2, 3, 4], none, none], dtype="<u2")
    b = np.array([[1, 2, 3, 9], [5, 6, 7, 8], none, [1, 2, 3, 4]], dtype="<u2")
    # two documents without shingles agree on every value, yet are not duplicates of each other or of anything
    assert similarities(a, b).tolist() == [0.75, 0.0, 0.0, 0.0]


def test_read_sorted_coalesces_near_rows_and_checks_bounds(tmp_path, monkeypatch):
    import numpy as np

    from lifecycle.data.curate import dedup

    sigs = np.arange(100 * 3, dtype="<u2").reshape(100, 3)
    sigs.tofile(tmp_path / "00000.sig")
    rows = dedup.SignatureRows(tmp_path / "00000.sig", 3)
    calls = []
    real = os.pread
    monkeypatch.setattr(dedup.os, "pread", lambda fd, n, off: calls.append((n, off)) or real(fd, n, off))
    want = np.array([0, 2, 5, 40, 41, 99])
    assert (rows.read_sorted(want, max_gap=4) == sigs[want]).all()
    assert [(n // 6, off // 6) for n, off in calls] == [(6, 0), (2, 40), (1, 99)]  # rows < 4 apart share a read
    calls.clear()
    assert (rows.read_sorted(want, max_gap=1) == sigs[want]).all() and len(calls) == len(want)
    assert rows.read_sorted(np.array([], dtype=np.int64)).shape == (0, 3)
    with pytest.raises(IndexError, match="row 100 of 100"):
        rows.read_sorted(np.array([3, 100]))
    rows.close()


def test_signature_rows_are_read_not_mapped(tmp_path):
    """The cluster stage reads full signatures a row at a time (pread): a memory map would count every touched page
    of a corpus-sized file in the process's RSS."""
    import numpy as np

    from lifecycle.data.curate.dedup import SignatureRows

    sigs = np.arange(5 * 4, dtype="<u2").reshape(5, 4)
    sigs.tofile(tmp_path / "00000.sig")
    rows = SignatureRows(tmp_path / "00000.sig", 4)
    assert len(rows) == 5 and rows[3].tolist() == [12, 13, 14, 15]
    maps = open(f"/proc/{os.getpid()}/maps").read() if os.path.exists(f"/proc/{os.getpid()}/maps") else ""
    assert "00000.sig" not in maps
    with pytest.raises(IndexError, match="row 5 of 5"):
        rows[5]
    rows.close()
    rows.close()  # idempotent


def test_tree_sampler_sees_forked_children():
    from lifecycle.data.curate.rss import TreeSampler, process_tree

    child = os.fork()
    if child == 0:  # a child holding ~60 MB of its own memory for a moment
        block = bytearray(60 << 20)
        block[::4096] = b"x" * len(block[::4096])
        time.sleep(1.5)
        os._exit(0)
    try:
        assert child in process_tree(os.getpid())
        sampler = TreeSampler(os.getpid(), interval=0.1)
        sampler.start()
        time.sleep(1.0)
        peaks = sampler.stop()
    finally:
        os.waitpid(child, 0)
    assert peaks["processes"] >= 2 and peaks["samples"] >= 3
    assert peaks["anon_mb"] >= 60 and peaks["rss_mb"] >= peaks["anon_mb"]
    assert 60 <= peaks["pss_mb"] <= peaks["rss_mb"]  # shared pages counted once


@pytest.mark.shared_data
def test_scale_corpus_streams_planted_duplicates(shared_data, tmp_path):
    from lifecycle.data.curate.bench_data import scale_corpus

    counts = scale_corpus(shared_data, tmp_path / "in.jsonl", 2, near_rate=0.1, exact_rate=0.1)
    lines = (tmp_path / "in.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(ln)["text"] for ln in lines]
    assert len(texts) == counts["documents"] == sum(counts[k] for k in ("original_en", "original_zh",
                                                                          "planted_near", "planted_exact"))
    assert abs(counts["bytes"] - 2e6) < 20_000 and counts["original_zh"] > 0.2 * counts["documents"]
    assert counts["planted_near"] > 50 and counts["planted_exact"] > 50
    assert len(set(texts)) > 0.95 * len(texts)  # originals do not repeat (exact copies change case/punctuation)
    assert scale_corpus(shared_data, tmp_path / "again.jsonl", 2, near_rate=0.1, exact_rate=0.1) == counts


def test_tasks_are_a_multiple_of_the_workers_and_none_holds_more_than_task_mb(tmp_path):
    from lifecycle.data.curate.config import CurateConfig
    from lifecycle.data.curate.pipeline import num_tasks

    src = tmp_path / "in.jsonl"
    with open(src, "wb") as fh:
        fh.truncate(5_000_001)  # a sparse 5 MB file: only its size matters here

    def tasks(workers: int, task_mb: int) -> int:
        config = CurateConfig(inputs=(str(src),), output_dir=str(tmp_path / "out"), workers=workers, task_mb=task_mb)
        return num_tasks(config, {str(src): "in"})

    assert tasks(1, 256) == 1 and tasks(2, 256) == 2 and tasks(3, 256) == 3  # small input: one task per worker
    assert tasks(1, 1) == 6  # 5.000001 MB in tasks of at most 1 MB
    assert tasks(2, 1) == 6 and tasks(4, 1) == 8 and tasks(5, 1) == 10  # rounded up to full rounds of workers
    assert tasks(2, 2) == 4 and tasks(3, 5) == 3
    for workers in (1, 2, 3, 4):
        for task_mb in (1, 2, 3, 5, 256):
            n = tasks(workers, task_mb)
            assert n % workers == 0 and 5_000_001 / n <= task_mb * 1_000_000, (workers, task_mb, n)


def test_input_beyond_workers_times_task_mb_runs_as_more_tasks_with_the_same_output(tmp_path):
    from lifecycle.data.curate.cli import curate
    from lifecycle.data.curate.config import CurateConfig, LangIdConfig, QualityConfig
    from lifecycle.data.curate.pipeline import num_tasks

    from .conftest import chinese_doc

    rng = random.Random(11)
    docs = [english_doc(rng, 12) if i % 3 else chinese_doc(rng, 6) for i in range(2600)]
    docs += docs[:40]  # exact duplicates across the task boundaries
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs), encoding="utf-8")
    assert 2_000_000 < src.stat().st_size < 3_000_000

    def run(name: str, task_mb: int):
        config = CurateConfig(inputs=(str(src),), output_dir=str(tmp_path / name), task_mb=task_mb,
                              langid=LangIdConfig(enabled=False), quality=QualityConfig(enabled=False))
        manifest, _ = curate(config, show_progress=False)
        texts = sorted(json.loads(ln)["text"] for p in (tmp_path / name / "data").glob("*.jsonl")
                       for ln in p.read_text(encoding="utf-8").splitlines())
        return num_tasks(config, {str(src): "in"}), manifest, texts

    tasks_one, manifest_one, texts_one = run("one", 256)
    tasks_three, manifest_three, texts_three = run("three", 1)
    assert (tasks_one, tasks_three) == (1, 3)
    assert len(list((tmp_path / "three" / "work" / "logs" / "filter" / "completions").iterdir())) == 3
    assert manifest_three.extra["curate"]["read"]["documents"] == len(docs)
    assert manifest_three.removed == manifest_one.removed and manifest_one.removed["dedup_exact/exact_duplicate"] >= 40
    assert texts_three == texts_one
