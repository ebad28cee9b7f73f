"""Data files of every format become records with the line they start on; bad files fail naming file and line."""

from __future__ import annotations

import bz2
import gzip
import json

import pytest

from lifecycle.errors import DataError
from serve.evaluation.records import ReadOptions, read_lines_column, read_records


def _fields(records):
    return [({k: v for k, v in r.fields.items() if k != "_source"}, r.line) for r in records]


def test_jsonl_gz_and_blank_lines(tmp_path):
    path = tmp_path / "a.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write('{"q": "one"}\n\n{"q": "two"}\n')
    records = list(read_records(path))
    assert _fields(records) == [({"q": "one"}, 1), ({"q": "two"}, 3)]
    assert records[0].fields["_source"] == "a" and records[1].where == f"{path}:3"


def test_csv_with_quoted_newlines_and_unnamed_index(tmp_path):
    path = tmp_path / "subject_test.csv"
    path.write_text(',Question,Answer\n0,"two\nlines",A\n1,plain,B\n', encoding="utf-8")
    assert _fields(read_records(path)) == [({"index": "0", "Question": "two\nlines", "Answer": "A"}, 2),
                                           ({"index": "1", "Question": "plain", "Answer": "B"}, 4)]


def test_json_list_and_jsonl_in_disguise(tmp_path):
    (tmp_path / "l.json").write_text(json.dumps({"data": [{"a": 1}, {"a": 2}]}))
    assert _fields(read_records(tmp_path / "l.json")) == [({"a": 1}, 1), ({"a": 2}, 2)]
    (tmp_path / "d.json").write_text('{"a": 1}\n{"a": 2}\n')
    assert _fields(read_records(tmp_path / "d.json")) == [({"a": 1}, 1), ({"a": 2}, 2)]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"q": ["x", "y"], "gold": [0, 1]}), tmp_path / "t.parquet")
    assert _fields(read_records(tmp_path / "t.parquet")) == [({"q": "x", "gold": 0}, 1), ({"q": "y", "gold": 1}, 2)]


def test_txt_splits(tmp_path):
    path = tmp_path / "w.txt"
    path.write_text(" \n = A = \n \n a1 \n = = s = = \n a2 \n = B = \n b1 \n", encoding="utf-8")
    by_regex = list(read_records(path, ReadOptions(txt_split="regex", txt_split_regex=r"\n(?= = [^=])")))
    assert [r.line for r in by_regex] == [2, 7]
    assert by_regex[0].fields["text"].startswith(" = A = ") and "a2" in by_regex[0].fields["text"]
    assert [r.line for r in read_records(path, ReadOptions(txt_split="line"))] == [2, 4, 5, 6, 7, 8]


def test_lines_format_bz2_and_truncation(tmp_path):
    path = tmp_path / "h.txt.bz2"
    path.write_bytes(bz2.compress("ctx one\n1\na\nb\nctx two\n0\nc\nd\n".encode()))
    opts = ReadOptions(format="lines", lines_fields=("query", "label", "e0", "e1"))
    assert _fields(read_records(path, opts)) == [({"query": "ctx one", "label": "1", "e0": "a", "e1": "b"}, 1),
                                                 ({"query": "ctx two", "label": "0", "e0": "c", "e1": "d"}, 5)]
    path.write_bytes(bz2.compress(b"ctx\n1\na\n"))
    with pytest.raises(DataError, match=r"h.txt.bz2:1: the last record has 3 lines"):
        list(read_records(path, opts))


@pytest.mark.parametrize("name, content, needle", [
    ("bad.jsonl", '{"a": 1}\n{"a": \n', "bad.jsonl:2: invalid JSON"),
    ("list.jsonl", '[1, 2]\n', "list.jsonl:1: expected a JSON object"),
    ("short.csv", "a,b\n1,2\n3\n", "short.csv:3: 1 columns, the header has 2"),
    ("data.xyz", "x", "cannot tell the format"),
])
def test_bad_files_name_file_and_line(tmp_path, name, content, needle):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=needle):
        list(read_records(tmp_path / name))


def test_invalid_utf8_and_missing_file(tmp_path):
    (tmp_path / "latin.jsonl").write_bytes('{"a": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="invalid UTF-8"):
        list(read_records(tmp_path / "latin.jsonl"))
    with pytest.raises(DataError, match="no such data file"):
        list(read_records(tmp_path / "missing.jsonl"))


def test_side_column(tmp_path):
    (tmp_path / "labels.lst").write_text("0\n1\n\n")
    assert read_lines_column(tmp_path / "labels.lst") == ["0", "1"]
