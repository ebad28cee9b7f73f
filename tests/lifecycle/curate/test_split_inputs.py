"""One big input file is shared by N workers: line-aligned byte ranges (shards.plan_parts) read back to exactly the
documents, line numbers and problems of a whole-file read, and a split run writes what a 1-worker run writes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lifecycle.data.curate.shards import Part, line_aligned_starts, plan_parts
from lifecycle.data.readers import ReadStats, iter_documents, iter_span

from .conftest import chinese_doc, english_doc, jsonl
from .test_pipeline import output_records, run


def _read_parts(parts: list[Part], txt_mode: str) -> tuple[list, ReadStats]:
    stats = ReadStats(max_examples=1000)
    docs = []
    for part in parts:
        docs += list(iter_span(part.path, part.start, part.end, part.first_line, txt_mode=txt_mode, stats=stats))
    return docs, stats


def _whole(path: Path, txt_mode: str) -> tuple[list, ReadStats]:
    stats = ReadStats(max_examples=1000)
    return list(iter_documents([path], txt_mode=txt_mode, stats=stats)), stats


@pytest.fixture()
def big_jsonl(tmp_path: Path) -> Path:
    rng = random.Random(3)
    texts = [english_doc(rng, rng.randint(1, 12)) if i % 3 else chinese_doc(rng, rng.randint(1, 4))
             for i in range(300)]
    bad = {i: line for i, line in zip(range(7, 300, 37), [b'{"text": "unterminated', b'{"body": 1}',
                                                            b'{"text": "caf\xe9"}', b"\x00\x01binary", b"[1, 2]",
                                                            b"", b'{"text": "   "}', b"not json"])}
    return jsonl(tmp_path / "big.jsonl", texts, bad)


@pytest.mark.parametrize("num_parts", [2, 3, 7, 50])
def test_jsonl_ranges_read_back_the_whole_file(big_jsonl, num_parts):
    starts = line_aligned_starts(big_jsonl, num_parts, paragraph=False)
    assert len(starts) == num_parts and starts[0] == (0, 1)
    data = big_jsonl.read_bytes()
    for offset, line in starts:  # every start is a line start, numbered like the file
        assert offset == 0 or data[offset - 1:offset] == b"\n"
        assert data[:offset].count(b"\n") + 1 == line
    ends = [s for s, _ in starts[1:]] + [None]
    parts = [Part(str(big_jsonl), 0, s, e, ln) for (s, ln), e in zip(starts, ends)]
    (docs, stats), (whole, whole_stats) = _read_parts(parts, "paragraph"), _whole(big_jsonl, "paragraph")
    assert docs == whole and len(whole) > 250
    # 8 bad lines, of which the blank one is a separator, not a problem
    assert sorted(stats.examples) == sorted(whole_stats.examples) and len(whole_stats.examples) == 7
    assert stats.files[str(big_jsonl)] == whole_stats.files[str(big_jsonl)]


@pytest.mark.parametrize("txt_mode", ["paragraph", "line"])
def test_txt_ranges_never_cut_a_paragraph(tmp_path, txt_mode):
    rng = random.Random(4)
    paragraphs = ["\n".join(english_doc(rng, 1) for _ in range(rng.randint(1, 6))) for _ in range(120)]
    path = tmp_path / "big.txt"
    path.write_bytes(("\n\n".join(paragraphs) + "\n").encode() + b"\xff\xfe bad bytes\n\n" + "尾段。\n".encode())
    starts = line_aligned_starts(path, 9, paragraph=txt_mode == "paragraph")
    assert len(starts) > 5
    ends = [s for s, _ in starts[1:]] + [None]
    parts = [Part(str(path), 0, s, e, ln) for (s, ln), e in zip(starts, ends)]
    (docs, stats), (whole, whole_stats) = _read_parts(parts, txt_mode), _whole(path, txt_mode)
    assert docs == whole and stats.examples == whole_stats.examples
    (problem,) = [p for p in stats.examples if "empty document" not in p]  # line mode: blank lines are empty
    bad_line = path.read_bytes().count(b"\n") - 2  # then a blank line and the last paragraph
    assert problem.startswith(f"{path}:{bad_line}: invalid UTF-8")


def test_plan_parts_splits_only_what_it_can_and_deals_contiguously(tmp_path, big_jsonl):
    gz = tmp_path / "small.jsonl.gz"
    import gzip

    gz.write_bytes(gzip.compress(big_jsonl.read_bytes()))
    csv = tmp_path / "t.csv"
    csv.write_text("text\n" + "a,\n" * 20000)
    ranks = plan_parts([str(big_jsonl), str(gz), str(csv)], 4, txt_mode="paragraph", split_bytes=1024)
    flat = [p for rank in ranks for p in rank]
    assert [p.path for p in flat] == sorted(p.path for p in flat)  # contiguous: (file, offset) order by rank
    assert {p.path for p in flat if not p.is_whole} == {str(big_jsonl)}  # gzip and csv are read whole
    assert sum(p.num_bytes for p in flat if p.path == str(big_jsonl)) == big_jsonl.stat().st_size
    assert all(rank for rank in ranks)
    # one worker, or files under split_bytes: whole files as before
    assert plan_parts([str(big_jsonl)], 1, txt_mode="paragraph", split_bytes=1) == [[Part(str(big_jsonl),
                                                                                        big_jsonl.stat().st_size)]]
    assert all(p.is_whole for r in plan_parts([str(big_jsonl)], 4, txt_mode="paragraph", split_bytes=1 << 30)
               for p in r)


def test_one_big_file_shared_by_workers_gives_the_one_worker_output(messy_corpus):
    """The English file is cut into ~4 KB ranges over 3 workers; everything the run reports is what one worker
    reports (outputs order-insensitive: shards differ), bad lines named with the same file and line."""
    one, _ = run(messy_corpus, "one", workers=1)
    split, _ = run(messy_corpus, "split", workers=3, split_bytes=4096)
    parts = [json.loads(p.read_text()) for p in (messy_corpus["root"] / "split" / "work" / "files").glob("*.json")]
    en = next(p for p in one.extra["curate"]["config"]["inputs"] if p.endswith("en"))
    assert sum(f"{en}/part1.jsonl" in p for p in parts) >= 2  # the file was in fact shared
    key = lambda r: (r["id"], r["text"])  # noqa: E731
    records_one = sorted(map(key, output_records(messy_corpus["root"] / "one")))
    records_split = sorted(map(key, output_records(messy_corpus["root"] / "split")))
    assert records_one == records_split and len(records_one) > 70
    a, b = one.extra["curate"], split.extra["curate"]
    assert a["read"] == b["read"] and a["blocks"] == b["blocks"]
    assert sorted(a["problems"]) == sorted(b["problems"])
    assert messy_corpus["bad_lines"] <= {p.split(": ")[0] for p in b["problems"]}
    assert one.sources == split.sources and sum(s.num_documents for s in split.sources) == 83
