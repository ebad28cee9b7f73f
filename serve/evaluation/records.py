"""Records: the rows of an evaluation data file, each with the place it came from (file, line).

Formats, by suffix (`.gz` / `.bz2` compression is undone first): jsonl, json (a list, or a list under
"data"/"rows"), csv (header row; quoted newlines allowed), parquet, txt (documents split per paragraph,
line, whole file, or by a regex: `text` column), and `lines` — fixed groups of lines, one field per
line (the llama.cpp HellaSwag text form: context, label, four endings).

Unlike lifecycle/data/readers.py (a training corpus skips a bad line and goes on) an evaluation set is
small and every item counts: any bad record is a `DataError` naming file and line, and a record without
a column a task needs is refused by the task (serve/evaluation/items.py) naming file, line and column.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lifecycle.errors import DataError

FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "txt",
           ".text": "txt", ".md": "txt", ".lst": "txt"}
TXT_SPLITS = ("paragraph", "line", "file", "regex")


@dataclass(frozen=True)
class Record:
    """One row. `line` is the 1-based line it starts on (jsonl/csv/txt/lines), or the item's 1-based position
    (json list, parquet row). `fields` are the row's columns, plus `_source` (the file name without its
    suffixes, e.g. "anatomy_test": MMLU's subject lives only there)."""

    source: str
    line: int
    fields: Mapping[str, Any]

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass(frozen=True)
class ReadOptions:
    format: str | None = None  # None: from the suffix
    txt_split: str = "paragraph"
    txt_split_regex: str | None = None  # for txt_split: regex; the text is split where it matches
    lines_fields: tuple[str, ...] = ()  # for format: lines; one field per line, a record per group
    csv_delimiter: str = ","


def format_of(path: Path, options: ReadOptions) -> str:
    if options.format is not None:
        return options.format
    name = path.name.lower()
    for suffix in (".gz", ".bz2"):
        name = name.removesuffix(suffix)
    fmt = FORMATS.get(Path(name).suffix)
    if fmt is None:
        raise DataError(f"{path}: cannot tell the format from the suffix; use one of {', '.join(FORMATS)} "
                        "(optionally .gz/.bz2) or set `format:` in the task file")
    return fmt


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".bz2"):
        name = name.removesuffix(suffix)
    return Path(name).stem


def _open_text(path: Path, newline: str | None = None) -> io.TextIOBase:
    """Text, a BOM dropped; universal newlines except for csv (its reader wants newline="")."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline=newline)
    if name.endswith(".bz2"):
        return bz2.open(path, "rt", encoding="utf-8-sig", newline=newline)
    return open(path, encoding="utf-8-sig", newline=newline)


def read_records(path: str | Path, options: ReadOptions = ReadOptions()) -> Iterator[Record]:
    """Stream the records of one file. Errors (unreadable file, bad JSON, bad UTF-8) name file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    fmt = format_of(path, options)
    reader = {"jsonl": _jsonl, "json": _json, "csv": _csv, "parquet": _parquet, "txt": _txt,
              "lines": _lines}.get(fmt)
    if reader is None:
        raise DataError(f"{path}: unknown format {fmt!r}; use one of jsonl, json, csv, parquet, txt, lines")
    stem = _stem(path)
    try:
        for line, fields in reader(path, options):
            yield Record(str(path), line, {"_source": stem, **fields})
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: invalid UTF-8 ({err.reason} at byte {err.start} of a block); re-encode the file "
                        "as UTF-8") from None
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read: {err}") from None


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    with _open_text(path) as fh:
        for number, text in enumerate(fh, start=1):
            yield number, text.rstrip("\r\n")


def _jsonl(path: Path, options: ReadOptions) -> Iterator[tuple[int, dict]]:
    for number, text in _numbered_lines(path):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: invalid JSON at column {err.colno}: {err.msg}") from None
        if not isinstance(value, dict):
            raise DataError(f"{path}:{number}: expected a JSON object per line, got {type(value).__name__}")
        yield number, value


def _json(path: Path, options: ReadOptions) -> Iterator[tuple[int, dict]]:
    with _open_text(path) as fh:
        raw = fh.read()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        # Many ".json" evaluation files are JSON Lines in disguise (MMLU's QLoRA export): read them as such.
        if err.msg == "Extra data":
            yield from _jsonl(path, options)
            return
        raise DataError(f"{path}:{err.lineno}: invalid JSON at column {err.colno}: {err.msg}") from None
    if isinstance(data, dict):
        key = next((k for k in ("data", "rows") if isinstance(data.get(k), list)), None)
        if key is None:
            raise DataError(f'{path}: a JSON object must hold the records as a list under "data" or "rows"')
        data = data[key]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for index, value in enumerate(data, start=1):
        if not isinstance(value, dict):
            raise DataError(f"{path}:{index}: item {index} is not a JSON object but {type(value).__name__}")
        yield index, value


def _csv(path: Path, options: ReadOptions) -> Iterator[tuple[int, dict]]:
    csv.field_size_limit(max(csv.field_size_limit(), 64 << 20))
    with _open_text(path, newline="") as fh:
        reader = csv.reader(fh, delimiter=options.csv_delimiter)
        try:
            header = next(reader, None)
            if header is None:
                return
            # A blank first header cell is an unnamed index column (pandas' to_csv, CMMLU): call it "index".
            header = [name or ("index" if i == 0 else f"column{i}") for i, name in enumerate(header)]
            start = reader.line_num + 1
            for row in reader:
                if row:
                    if len(row) != len(header):
                        raise DataError(f"{path}:{start}: {len(row)} columns, the header has {len(header)} "
                                        f"({', '.join(header)})")
                    yield start, dict(zip(header, row))
                start = reader.line_num + 1
        except csv.Error as err:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV: {err}") from None


def _parquet(path: Path, options: ReadOptions) -> Iterator[tuple[int, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        row = 0
        for batch in table.iter_batches(batch_size=1024):
            for value in batch.to_pylist():
                row += 1
                yield row, value
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable parquet file: {err}") from None


def _txt(path: Path, options: ReadOptions) -> Iterator[tuple[int, dict]]:
    split = options.txt_split
    if split == "line":
        for number, text in _numbered_lines(path):
            if text.strip():
                yield number, {"text": text}
        return
    with _open_text(path) as fh:
        whole = fh.read()
    if split == "file":
        if whole.strip():
            yield 1, {"text": whole}
        return
    if split == "paragraph":
        pattern = re.compile(r"\n[ \t]*\n")
    elif split == "regex" and options.txt_split_regex:
        pattern = re.compile(options.txt_split_regex)
    else:
        raise DataError(f"{path}: txt_split must be one of {', '.join(TXT_SPLITS)} (regex with txt_split_regex)")
    start = 0
    for match in [*pattern.finditer(whole), None]:
        end = len(whole) if match is None else match.start()
        chunk = whole[start:end]
        if chunk.strip():
            line = whole.count("\n", 0, start) + 1 + chunk[:len(chunk) - len(chunk.lstrip())].count("\n")
            yield line, {"text": chunk.strip("\n")}
        if match is not None:
            start = match.end()


def _lines(path: Path, options: ReadOptions) -> Iterator[tuple[int, dict]]:
    names = options.lines_fields
    if not names:
        raise DataError(f"{path}: format lines needs lines_fields (one name per line of a record)")
    group: list[str] = []
    first = 1
    for number, text in _numbered_lines(path):
        if not group:
            first = number
        group.append(text)
        if len(group) == len(names):
            yield first, dict(zip(names, group))
            group = []
    if group:
        raise DataError(f"{path}:{first}: the last record has {len(group)} lines, expected {len(names)} "
                        f"({', '.join(names)}): the file is truncated or lines_fields is wrong")


def read_lines_column(path: str | Path) -> list[str]:
    """A side file of one value per line (PIQA's valid-labels.lst), joined to the records by position."""
    return [text for _, text in _numbered_lines(Path(path)) if text.strip()]


def inline_records(items: Sequence[Mapping[str, Any]], source: str = "items") -> list[Record]:
    """Records given in a request (the server's Evaluate): `line` is the 1-based item position."""
    return [Record(source, i, {"_source": source, **item}) for i, item in enumerate(items, start=1)]
