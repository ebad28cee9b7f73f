"""DatasetManifest: stable content hash, atomic save, clear errors on load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lifecycle.data.manifest import DatasetManifest, SourceInfo, sha256_file, sources_from_stats
from lifecycle.data.readers import ReadStats, read_documents
from lifecycle.errors import DataError


def make(**extra_overrides: object) -> DatasetManifest:
    sources = [SourceInfo(path="/data/a.jsonl", sha256="a" * 64, num_bytes=10, num_documents=3, num_skipped=1),
               SourceInfo(path="/data/b.txt", sha256="b" * 64, num_bytes=20, num_documents=5, num_skipped=0)]
    extra = {"seq_len": 512, "tokenizer": {"sha256": "c" * 64, "vocab_size": 8000}, **extra_overrides}
    return DatasetManifest(sources=sources, num_documents=8, num_tokens=4096,
                           removed={"dedup": 2, "too_short": 1}, extra=extra)


def test_content_hash_stable_and_sensitive() -> None:
    base = make()
    assert base.content_hash() == make().content_hash()
    assert len(base.content_hash()) == 64
    reordered = make()
    reordered.removed = {"too_short": 1, "dedup": 2}
    reordered.extra = {"tokenizer": {"vocab_size": 8000, "sha256": "c" * 64}, "seq_len": 512}
    assert reordered.content_hash() == base.content_hash()
    moved = make()
    moved.sources[0].path = "/elsewhere/a.jsonl"  # location is not content
    assert moved.content_hash() == base.content_hash()
    changed = make()
    changed.sources[1].sha256 = "d" * 64
    assert changed.content_hash() != base.content_hash()
    assert make(seq_len=1024).content_hash() != base.content_hash()


def test_save_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    manifest = make()
    manifest.save(path)
    loaded = DatasetManifest.load(path)
    assert loaded == manifest
    assert loaded.content_hash() == manifest.content_hash()
    assert json.loads(path.read_text())["content_hash"] == manifest.content_hash()
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temporary file left


def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    with pytest.raises(DataError, match="no such dataset manifest"):
        DatasetManifest.load(path)
    path.write_text('{"sources": [', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:1: invalid JSON"):
        DatasetManifest.load(path)
    data = make().to_dict()
    del data["num_documents"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="missing key 'num_documents'"):
        DatasetManifest.load(path)
    data = make().to_dict()
    del data["sources"][1]["sha256"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"sources\[1\]: missing key 'sha256'"):
        DatasetManifest.load(path)
    data = make().to_dict()
    data["num_documents"] = 9  # edited by hand: the stored hash no longer matches
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="content_hash .* does not match"):
        DatasetManifest.load(path)


def test_sources_from_read_stats(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "今天天气很好。"}\nbad\n', encoding="utf-8")
    stats = ReadStats()
    read_documents(path, stats=stats)
    (source,) = sources_from_stats(stats)
    assert (source.path, source.num_documents, source.num_skipped) == (str(path), 1, 1)
    assert source.sha256 == sha256_file(path) and source.num_bytes == path.stat().st_size
    import hashlib

    assert sha256_file(path, chunk=3) == hashlib.sha256(path.read_bytes()).hexdigest()
