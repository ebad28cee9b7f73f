"""Readers: each format, the skip-or-raise policy for bad records, and deterministic expansion."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from lifecycle.data.readers import Document, ReadStats, expand_inputs, iter_documents, read_documents
from lifecycle.errors import DataError

ZH = "今天天气很好。"


def texts(docs: list[Document]) -> list[str]:
    return [d.text for d in docs]


def test_txt_modes(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text(f"first line\nsecond line\n\n\n{ZH}\n  \nlast\n", encoding="utf-8")
    paragraphs = read_documents(path)
    assert texts(paragraphs) == ["first line\nsecond line", ZH, "last"]
    assert [d.line for d in paragraphs] == [1, 5, 7]
    assert paragraphs[0].source == str(path)
    stats = ReadStats()
    lines = read_documents(path, txt_mode="line", stats=stats)
    assert texts(lines) == ["first line", "second line", ZH, "last"]
    assert stats.files[str(path)].skip_reasons["empty document"] == 3
    (whole,) = read_documents(path, txt_mode="file")
    assert whole.text.startswith("first line\nsecond line") and whole.text.endswith("last") and whole.line == 1


def test_jsonl_bad_line_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    rows = [json.dumps({"text": "good one"}), "{not json", json.dumps({"text": ZH}, ensure_ascii=False),
            json.dumps([1, 2]), json.dumps({"body": "x"}), json.dumps({"text": 3}), json.dumps({"text": "  "})]
    path.write_text("\n".join(rows) + "\n\n", encoding="utf-8")  # a trailing blank line is not a record
    stats = ReadStats()
    docs = read_documents(path, stats=stats)
    assert texts(docs) == ["good one", ZH]
    assert [d.line for d in docs] == [1, 3]
    file_stats = stats.files[str(path)]
    assert (file_stats.num_documents, file_stats.num_skipped) == (2, 5)
    assert file_stats.skip_reasons["invalid JSON"] == 1
    assert file_stats.skip_reasons["not a JSON object"] == 1
    assert file_stats.skip_reasons['no "text" field'] == 1
    assert file_stats.skip_reasons['"text" is not a string'] == 1
    assert file_stats.skip_reasons["empty document"] == 1
    assert stats.examples[0].startswith(f"{path}:2: invalid JSON")
    assert "invalid JSON" in stats.summary()


def test_jsonl_strict_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a"}\n{oops\n{"text": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:2: invalid JSON"):
        read_documents(path, strict=True)


def test_jsonl_custom_field_and_gzip(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"content": ZH}, ensure_ascii=False) + "\n")
    assert texts(read_documents(path, text_field="content")) == [ZH]


def test_gzip_txt_and_corrupt_gzip(tmp_path: Path) -> None:
    good = tmp_path / "a.txt.gz"
    good.write_bytes(gzip.compress(f"{ZH}\n".encode()))
    assert texts(read_documents(good)) == [ZH]
    bad = tmp_path / "b.txt.gz"
    bad.write_bytes(gzip.compress(("line\n" * 5000).encode())[:-10])  # truncated: no CRC trailer
    with pytest.raises(DataError, match=rf"{bad}: cannot read"):
        read_documents(bad)


def test_invalid_utf8_line_skipped_or_strict(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"good\n\ncaf\xe9 au lait\n\n" + ZH.encode() + b"\n")
    stats = ReadStats()
    assert texts(read_documents(path, stats=stats)) == ["good", ZH]
    assert stats.files[str(path)].skip_reasons["invalid UTF-8"] == 1
    assert "byte offset 9" in stats.examples[0]
    with pytest.raises(DataError, match=rf"{path}:3: invalid UTF-8: byte offset 9"):
        read_documents(path, strict=True)


def test_binary_junk_does_not_crash(tmp_path: Path) -> None:
    path = tmp_path / "junk.txt"
    path.write_bytes(bytes(range(256)) * 50 + b"\nreal text here\n")
    stats = ReadStats()
    docs = read_documents(path, txt_mode="line", stats=stats)
    assert texts(docs)[-1] == "real text here"
    assert stats.num_skipped >= 1


def test_json_list_and_data_object(tmp_path: Path) -> None:
    listed = tmp_path / "a.json"
    listed.write_text(json.dumps([{"text": "one"}, {"x": 1}, {"text": ZH}], ensure_ascii=False), encoding="utf-8")
    docs = read_documents(listed)
    assert texts(docs) == ["one", ZH] and [d.line for d in docs] == [1, 3]
    wrapped = tmp_path / "b.json"
    wrapped.write_text(json.dumps({"rows": [{"text": "r"}]}), encoding="utf-8")
    assert texts(read_documents(wrapped)) == ["r"]
    broken = tmp_path / "c.json"
    broken.write_text('[{"text": "a"},\n oops]', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{broken}:2: invalid JSON"):
        read_documents(broken)


def test_csv_with_quoted_newlines(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text(f'id,text\n1,"multi\nline"\n2,{ZH}\n3,\n', encoding="utf-8")
    docs = read_documents(path)
    assert texts(docs) == ["multi\nline", ZH]
    assert [d.line for d in docs] == [2, 4]
    with pytest.raises(DataError, match=r'no "body" column; the header has id, text'):
        read_documents(path, text_field="body")


def test_parquet_round_trip_in_batches(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    values = [f"doc {i}" for i in range(2500)] + [ZH, None, ""]
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": values, "n": list(range(len(values)))}), path, row_group_size=700)
    stats = ReadStats()
    docs = read_documents(path, stats=stats)
    assert texts(docs) == values[:2501]
    assert docs[2500].line == 2501
    assert stats.files[str(path)].num_skipped == 2
    with pytest.raises(DataError, match=r'no "body" column; columns are text, n'):
        read_documents(path, text_field="body")
    not_parquet = tmp_path / "b.parquet"
    not_parquet.write_bytes(b"hello")
    with pytest.raises(DataError, match=rf"{not_parquet}: not a readable parquet file"):
        read_documents(not_parquet)


def test_empty_inputs_and_missing_paths(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    with pytest.raises(DataError, match="empty corpus: no non-empty documents in"):
        read_documents(empty)
    assert list(iter_documents(empty)) == []
    with pytest.raises(DataError, match=rf"{tmp_path / 'nope.txt'}: no such file"):
        read_documents([empty, tmp_path / "nope.txt"])
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match="no data files in"):
        expand_inputs(tmp_path / "sub")
    odd = tmp_path / "a.pdf"
    odd.write_bytes(b"%PDF")
    with pytest.raises(DataError, match="unsupported file type"):
        expand_inputs(odd)


def test_directory_expansion_sorted_and_filtered(tmp_path: Path) -> None:
    for rel in ["b/z.jsonl", "b/a.txt", "a.md", "c.parquet", "notes.pdf", "x.py", ".hidden/h.txt", "d.txt.gz"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    expanded = expand_inputs([tmp_path, tmp_path / "a.md"])
    assert [p.relative_to(tmp_path).as_posix() for p in expanded] == ["a.md", "b/a.txt", "b/z.jsonl",
                                                                        "c.parquet", "d.txt.gz"]
    assert expand_inputs(str(tmp_path)) == expanded


def test_overlong_line_skipped_with_bounded_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lifecycle.data import readers

    monkeypatch.setattr(readers, "MAX_LINE_BYTES", 16)
    path = tmp_path / "a.txt"
    path.write_text("short\n" + "y" * 100 + "\nafter\n", encoding="utf-8")
    stats = ReadStats()
    assert texts(read_documents(path, txt_mode="line", stats=stats)) == ["short", "after"]
    assert stats.files[str(path)].skip_reasons["line too long"] == 1
    assert [d.line for d in read_documents(path, txt_mode="line")] == [1, 3]
