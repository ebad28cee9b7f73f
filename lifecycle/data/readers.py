"""Readers: raw text files -> a stream of `Document`s for tokenizer training and pretraining.

Formats: txt/text/md (split by blank lines, per line, or whole file), jsonl, json, csv and parquet,
plus `.txt.gz` / `.jsonl.gz`. Everything is a generator: a corpus larger than memory streams
through, and parquet is read one row batch at a time.

Two kinds of problems, two policies:
- A *file-level* problem (missing path, .json that does not parse, no such column in a csv or
  parquet header) is the user's to fix before anything useful can happen: always a `DataError`.
- A *record-level* problem (one bad jsonl line, one line of invalid UTF-8, an empty document) is
  skipped and counted in `ReadStats` with `file:line: reason`, because one bad line in a crawl of
  millions should not stop a run; `strict=True` turns it into a `DataError` naming file and line.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from lifecycle.errors import ConfigError, DataError

TxtMode = Literal["line", "paragraph", "file"]
TXT_MODES: tuple[str, ...] = get_args(TxtMode)
# Suffix (after stripping .gz) -> format. Only line-oriented formats may be gzipped: json and
# parquet are read whole / by random access, and a compressed csv has never been asked for.
FORMATS: dict[str, str] = {".txt": "txt", ".text": "txt", ".md": "txt", ".jsonl": "jsonl",
                           ".json": "json", ".csv": "csv", ".parquet": "parquet"}
GZIP_SUFFIXES: tuple[str, ...] = (".txt.gz", ".jsonl.gz")
SUPPORTED = ", ".join([*FORMATS, *GZIP_SUFFIXES])
# A "line" of a binary file may have no newline for gigabytes; past this we skip to the next one
# instead of holding it all in memory.
MAX_LINE_BYTES = 64 << 20
PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class Document:
    """One training document and where it came from, so any later problem can point back to it."""

    text: str
    source: str  # file path
    line: int  # 1-based line (jsonl/txt/csv) or row index+1 (parquet) or item index+1 (json list)


@dataclass
class FileStats:
    num_documents: int = 0
    num_skipped: int = 0
    skip_reasons: Counter[str] = field(default_factory=Counter)


@dataclass
class ReadStats:
    """Per-file counts of documents read and skipped (by reason), plus the first few problems.

    Pass one to `iter_documents` and read it after the stream is exhausted; the data manifest
    (`manifest.sources_from_stats`) records these counts per source.
    """

    files: dict[str, FileStats] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)  # "file:line: reason: detail"
    max_examples: int = 10

    def file(self, source: str) -> FileStats:
        return self.files.setdefault(source, FileStats())

    def record_document(self, source: str) -> None:
        self.file(source).num_documents += 1

    def record_skip(self, source: str, line: int, reason: str, detail: str = "") -> None:
        stats = self.file(source)
        stats.num_skipped += 1
        stats.skip_reasons[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{source}:{line}: {reason}" + (f": {detail}" if detail else ""))

    @property
    def num_documents(self) -> int:
        return sum(f.num_documents for f in self.files.values())

    @property
    def num_skipped(self) -> int:
        return sum(f.num_skipped for f in self.files.values())

    def summary(self) -> str:
        """One human-readable paragraph: totals, reasons, first examples."""
        reasons: Counter[str] = Counter()
        for f in self.files.values():
            reasons.update(f.skip_reasons)
        text = f"{self.num_documents} documents from {len(self.files)} files, {self.num_skipped} skipped"
        if reasons:
            text += " (" + ", ".join(f"{n} {r}" for r, n in reasons.most_common()) + ")"
            text += "; first problems:\n  " + "\n  ".join(self.examples)
        return text


def _format_of(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(GZIP_SUFFIXES):
        return FORMATS[Path(name[:-3]).suffix]
    return FORMATS.get(path.suffix.lower())


def expand_inputs(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Files as given, directories recursively; sorted and de-duplicated so runs are reproducible.

    Inside directories, files without a supported suffix and hidden entries (`.git`, `.cache`) are
    left out silently; a file named explicitly with an unsupported suffix is an error, since the
    user clearly meant it to be read.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: dict[Path, None] = {}  # insertion-ordered set
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            children = []
            for root, dirs, files in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".")]  # never descend into .git
                children += [Path(root) / f for f in files if not f.startswith(".")]
            for child in sorted(children):
                if _format_of(child) is not None:
                    found.setdefault(child, None)
        elif path.is_file():
            if _format_of(path) is None:
                raise DataError(f"{path}: unsupported file type; supported suffixes are {SUPPORTED} "
                                "(rename plain-text files to .txt)")
            found.setdefault(path, None)
        else:
            raise DataError(f"{path}: no such file or directory")
    if not found:
        raise DataError(f"no data files in {', '.join(map(str, paths))}: "
                        f"expected files ending in {SUPPORTED}")
    return list(found)


def iter_documents(paths: str | Path | Sequence[str | Path], *, text_field: str = "text",
                   txt_mode: TxtMode = "paragraph", stats: ReadStats | None = None,
                   strict: bool = False) -> Iterator[Document]:
    """Stream non-empty documents from every file in `paths` (see `expand_inputs`), in order.

    Not itself a generator: a bad `txt_mode` or a missing path is reported at the call, not at the
    first `next()` somewhere inside a training loop.
    """
    if txt_mode not in TXT_MODES:
        raise ConfigError(f"txt_mode={txt_mode!r} is not one of {', '.join(TXT_MODES)}")
    files = expand_inputs(paths)
    return _stream(files, text_field, txt_mode, stats if stats is not None else ReadStats(), strict)


def _stream(files: list[Path], text_field: str, txt_mode: TxtMode, stats: ReadStats,
            strict: bool) -> Iterator[Document]:
    for path in files:
        stats.file(str(path))  # listed even if it yields nothing, so the manifest shows it
        reader = _Reader(path, text_field=text_field, stats=stats, strict=strict)
        read = {"txt": lambda: reader.txt(txt_mode), "jsonl": reader.jsonl, "json": reader.json,
                "csv": reader.csv, "parquet": reader.parquet}[_format_of(path) or "txt"]
        try:
            yield from read()
        except (OSError, EOFError) as err:  # unreadable file, truncated or corrupt gzip
            raise DataError(f"{path}: cannot read: {err}") from err


def splittable(path: str | Path, txt_mode: TxtMode) -> bool:
    """Whether byte ranges of this file can be read on their own: uncompressed jsonl, or txt per line/paragraph."""
    fmt = None if str(path).lower().endswith(".gz") else _format_of(Path(path))
    return fmt == "jsonl" or (fmt == "txt" and txt_mode != "file")


def iter_span(path: str | Path, start: int, end: int | None, first_line: int, *, text_field: str = "text",
              txt_mode: TxtMode = "paragraph", stats: ReadStats | None = None) -> Iterator[Document]:
    """Documents of the lines that start in bytes [start, end) of one `splittable` file, numbered from
    `first_line` (the 1-based number of the line at `start`), so that workers sharing a large file report the
    same file:line a whole-file read would. `start` must be a line start (and, in paragraph mode, a paragraph
    boundary); lifecycle/data/curate/shards.py plans such ranges."""
    path = Path(path)
    if not splittable(path, txt_mode):
        raise ConfigError(f"{path}: only uncompressed jsonl and line/paragraph txt files can be read by byte range")
    stats = stats if stats is not None else ReadStats()
    stats.file(str(path))
    reader = _Reader(path, text_field=text_field, stats=stats, strict=False, span=(start, end, first_line))
    read = reader.jsonl if _format_of(path) == "jsonl" else (lambda: reader.txt(txt_mode))
    try:
        yield from read()
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err}") from err


def read_documents(paths: str | Path | Sequence[str | Path], *, text_field: str = "text",
                   txt_mode: TxtMode = "paragraph", stats: ReadStats | None = None,
                   strict: bool = False) -> list[Document]:
    """`iter_documents` as a list; an empty result is an error, since nothing downstream can use it."""
    stats = stats if stats is not None else ReadStats()
    docs = list(iter_documents(paths, text_field=text_field, txt_mode=txt_mode, stats=stats, strict=strict))
    if not docs:
        shown = paths if isinstance(paths, (str, Path)) else ", ".join(map(str, paths))
        raise DataError(f"empty corpus: no non-empty documents in {shown} ({stats.summary()})")
    return docs


class _Reader:
    """Per-file reading; one method per format. Owns the skip-or-raise policy."""

    def __init__(self, path: Path, *, text_field: str, stats: ReadStats, strict: bool,
                 span: tuple[int, int | None, int] | None = None) -> None:
        self.path, self.source = path, str(path)
        self.text_field, self.stats, self.strict = text_field, stats, strict
        self.span = span  # (start byte, end byte or None, number of the line at start): see iter_span

    def skip(self, line: int, reason: str, detail: str = "", *, always: bool = False) -> None:
        """Count a bad record, or raise for it under `strict` (empty documents are never fatal)."""
        if self.strict and not always:
            raise DataError(f"{self.source}:{line}: {reason}" + (f": {detail}" if detail else "")
                            + "; fix or remove this record, or read without strict to skip it")
        self.stats.record_skip(self.source, line, reason, detail)

    def emit(self, text: str, line: int) -> Iterator[Document]:
        if text.strip():
            self.stats.record_document(self.source)
            yield Document(text=text, source=self.source, line=line)
        else:
            self.skip(line, "empty document", always=True)

    def lines(self) -> Iterator[tuple[int, str]]:
        """(1-based line number, text without line ending); undecodable or binary lines are skipped.

        Decoding is per line so one bad byte costs one line, not the file, and the error can name
        the byte offset (of the uncompressed stream, for .gz).
        """
        offset, end, number = (self.span[0], self.span[1], self.span[2] - 1) if self.span else (0, None, 0)
        gzipped = self.path.name.lower().endswith(".gz")
        with gzip.open(self.path, "rb") if gzipped else open(self.path, "rb") as fh:
            fh.seek(offset)
            while (end is None or offset < end) and (raw := fh.readline(MAX_LINE_BYTES)):
                number += 1
                start, offset = offset, offset + len(raw)
                if len(raw) == MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    while (rest := fh.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                        offset += len(rest)
                    offset += len(rest)
                    self.skip(number, "line too long", f"over {MAX_LINE_BYTES} bytes at byte offset {start}")
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    self.skip(number, "invalid UTF-8", f"byte offset {start + err.start}; re-encode the file "
                              "as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
                    continue
                if "\x00" in text:  # NUL never occurs in text; this is a binary file or a corrupt region
                    self.skip(number, "binary data", f"NUL byte at byte offset {start + raw.index(0)}")
                    continue
                if number == 1:
                    text = text.removeprefix("\ufeff")  # a BOM would otherwise break json.loads
                yield number, text.rstrip("\r\n")

    def txt(self, mode: TxtMode) -> Iterator[Document]:
        if mode == "line":
            for number, text in self.lines():
                yield from self.emit(text, number)
            return
        block: list[str] = []
        first = 1
        for number, text in self.lines():
            if mode == "paragraph" and not text.strip():
                if block:
                    yield from self.emit("\n".join(block), first)
                block = []
                continue
            if not block:
                first = number
            block.append(text)
        if block:
            yield from self.emit("\n".join(block).strip("\n"), first)

    def _field(self, record: Any, number: int) -> str | None:
        """The text field of one jsonl/json record, or None after skipping it with the reason."""
        if not isinstance(record, dict):
            self.skip(number, "not a JSON object", f"got {type(record).__name__}")
        elif self.text_field not in record:
            keys = ", ".join(list(map(str, record))[:8])
            self.skip(number, f'no "{self.text_field}" field', f"keys are {keys or '(none)'}; "
                      "pass text_field (--text-field) to read another one")
        elif not isinstance(record[self.text_field], str):
            self.skip(number, f'"{self.text_field}" is not a string',
                      f"got {type(record[self.text_field]).__name__}")
        else:
            return record[self.text_field]
        return None

    def jsonl(self) -> Iterator[Document]:
        for number, line in self.lines():
            if not line.strip():
                continue  # a separator, like a blank line between paragraphs: not a record
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                self.skip(number, "invalid JSON", f"{err.msg} at column {err.colno}")
                continue
            if (text := self._field(record, number)) is not None:
                yield from self.emit(text, number)

    def json(self) -> Iterator[Document]:
        # The json module cannot stream; a .json corpus is read whole. Use jsonl for large corpora.
        raw = self.path.read_bytes()
        try:
            data = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
        except UnicodeDecodeError as err:
            raise DataError(f"{self.path}: invalid UTF-8 at byte offset {err.start}; re-encode the file "
                            "as UTF-8") from err
        except json.JSONDecodeError as err:
            raise DataError(f"{self.path}:{err.lineno}: invalid JSON at column {err.colno}: {err.msg}") from err
        if isinstance(data, dict):
            key = next((k for k in ("data", "rows") if isinstance(data.get(k), list)), None)
            if key is None:
                raise DataError(f'{self.path}: a JSON object must hold the records as a list under "data" '
                                f'or "rows"; found keys {", ".join(list(data)[:8]) or "(none)"}')
            data = data[key]
        if not isinstance(data, list):
            raise DataError(f"{self.path}: expected a JSON list of objects, got {type(data).__name__}")
        for index, record in enumerate(data):
            if (text := self._field(record, index + 1)) is not None:
                yield from self.emit(text, index + 1)

    def csv(self) -> Iterator[Document]:
        # Records may span lines (quoted newlines): remember the physical line each record starts on.
        first_line: list[int | None] = [None]

        def tracked() -> Iterator[str]:
            for number, text in self.lines():
                first_line[0] = first_line[0] or number
                yield text + "\n"

        # Documents are often longer than csv's default 128 KiB field limit. The limit is process
        # wide; we only ever raise it.
        csv.field_size_limit(max(csv.field_size_limit(), MAX_LINE_BYTES))
        reader = csv.reader(tracked())
        try:
            header = next(reader, None)
            if header is None:
                return
            if self.text_field not in header:
                raise DataError(f'{self.path}:1: no "{self.text_field}" column; the header has '
                                f"{', '.join(header[:12])}; pass text_field (--text-field) to read another one")
            column, first_line[0] = header.index(self.text_field), None
            for row in reader:
                number, first_line[0] = first_line[0] or 0, None
                if not row:
                    continue  # a blank line between records
                if len(row) <= column:
                    self.skip(number, "short CSV row", f"{len(row)} columns, header has {len(header)}")
                    continue
                yield from self.emit(row[column], number)
        except csv.Error as err:
            raise DataError(f"{self.path}:{first_line[0]}: malformed CSV: {err}") from err

    def parquet(self) -> Iterator[Document]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{self.path}: not a readable parquet file: {err}") from err
        names = pf.schema_arrow.names
        if self.text_field not in names:
            raise DataError(f'{self.path}: no "{self.text_field}" column; columns are {", ".join(names[:12])}; '
                            "pass text_field (--text-field) to read another one")
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[self.text_field]):
                for value in batch.column(0).to_pylist():
                    row += 1
                    if isinstance(value, str):
                        yield from self.emit(value, row)
                    elif value is None:
                        self.skip(row, "null text", always=True)
                    else:
                        self.skip(row, f'"{self.text_field}" is not a string', f"got {type(value).__name__}")
        except pa.ArrowException as err:
            raise DataError(f"{self.path}: corrupt parquet data after row {row}: {err}") from err
