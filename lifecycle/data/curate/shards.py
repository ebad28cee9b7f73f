"""Reading raw inputs into datatrove Documents, and intermediate/final shards in and out.

`InputReader` is the first step of the pipeline. `plan_parts` cuts the inputs into parts before the run:
a file larger than its share (total bytes / workers, and at least `split_bytes`) is cut into line-aligned
byte ranges when its format allows it (uncompressed jsonl; txt per line or paragraph, cut at blank lines),
so one big file does not leave all but one worker idle; every part carries the number of its first line,
so problems are reported with the same file:line as a whole-file read. The parts, in (file, offset)
order, are dealt to the ranks in contiguous runs of about equal bytes: rank r's documents all come
before rank r+1's, so datatrove's dedup, which keeps the first of a cluster by (rank, index), keeps the
same document with 1 worker or N. Reading goes through lifecycle.data.readers, which skips and counts
bad records (invalid JSON line, invalid UTF-8, binary junk, missing text field) with file and line and
keeps every good record next to a bad one. A file that cannot be read at all (a .json that does not
parse, a csv without the text column) is counted as "file_error" with its message and the run goes on.

Between stages, documents travel as `<dir>/<rank:05d>.jsonl.gz` ({text, id, metadata} per line): rank
r of the next stage reads exactly the file rank r wrote, so datatrove's dedup stages can refer to
documents by (rank, index). Files are written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from tqdm import tqdm

from lifecycle.data.curate.step import write_counts
from lifecycle.data.manifest import atomic_write_text
from lifecycle.data.readers import ReadStats, expand_inputs, iter_documents, iter_span, splittable
from lifecycle.errors import DataError


def source_names(inputs: Sequence[str | Path]) -> dict[str, str]:
    """file path -> source name (the name of the input, file or directory, it was found under)."""
    names: dict[str, str] = {}
    for raw in inputs:
        name = Path(raw).name or str(raw)
        for path in expand_inputs([raw]):
            names.setdefault(str(path), Path(name).stem if Path(raw).is_file() else name)
    return names


@dataclass(frozen=True)
class Part:
    """Bytes [start, end) of one input file (end None: to its end); first_line is the number of the line at start."""

    path: str
    num_bytes: int
    start: int = 0
    end: int | None = None
    first_line: int = 1

    @property
    def is_whole(self) -> bool:
        return self.start == 0 and self.end is None


READ_CHUNK = 8 << 20


def _count_newlines(fh, start: int, stop: int) -> int:
    fh.seek(start)
    count, left = 0, stop - start
    while left > 0 and (chunk := fh.read(min(READ_CHUNK, left))):
        count += chunk.count(b"\n")
        left -= len(chunk)
    return count


def _read_line(fh) -> tuple[int, bool] | None:
    """(bytes to the end of the current line, newline included; whether the line is blank), None at EOF.
    A line is read in pieces, so a multi-GB "line" of binary junk costs READ_CHUNK of memory."""
    num_bytes, is_blank = 0, True
    while piece := fh.readline(READ_CHUNK):
        num_bytes += len(piece)
        is_blank = is_blank and not piece.strip()  # ASCII whitespace only: blank for the reader too
        if piece.endswith(b"\n"):
            break
    return (num_bytes, is_blank) if num_bytes else None


def line_aligned_starts(path: str | Path, num_parts: int, *, paragraph: bool) -> list[tuple[int, int]]:
    """(byte offset, line number) where each of about `num_parts` equal parts of the file starts: the first
    line start at or after k * size / num_parts (in paragraph mode, the next blank line, so no paragraph is
    cut). One pass over the file counting newlines; fewer parts when the file has fewer boundaries."""
    size = os.path.getsize(path)
    starts = [(0, 1)]
    pos, line = 0, 1  # pos is the start of line number `line`
    with open(path, "rb") as fh:
        for k in range(1, num_parts):
            target = size * k // num_parts
            if target <= pos:
                continue
            line += _count_newlines(fh, pos, target - 1)  # line now holds byte target - 1
            pos = target - 1
            fh.seek(pos)
            while (step := _read_line(fh)) is not None:  # to the end of that line, then to a boundary
                pos, line = pos + step[0], line + 1
                if not paragraph:
                    break
                mark = fh.tell()
                following = _read_line(fh)
                fh.seek(mark)
                if following is None or following[1]:
                    break  # EOF, or the next line is blank: a paragraph boundary
            if pos >= size:
                break
            starts.append((pos, line))
    return starts


def plan_parts(paths: Sequence[str], workers: int, *, txt_mode: str, split_bytes: int) -> list[list[Part]]:
    """The parts each rank reads: big splittable files cut into line-aligned ranges, dealt out contiguously."""
    sizes = {p: os.path.getsize(p) for p in paths}
    total = sum(sizes.values())
    share = max(split_bytes, -(-total // workers))
    parts: list[Part] = []
    for path in sorted(paths):
        size = sizes[path]
        pieces = -(-size // share) if workers > 1 and size > share and splittable(path, txt_mode) else 1
        if pieces == 1:
            parts.append(Part(path, size))
            continue
        # splittable files are jsonl or txt; only txt read per paragraph must be cut at blank lines
        paragraph = txt_mode == "paragraph" and not path.lower().endswith(".jsonl")
        starts = line_aligned_starts(path, pieces, paragraph=paragraph)
        for (start, first_line), following in zip(starts, [*starts[1:], (None, None)]):
            end = following[0]
            parts.append(Part(path, (size if end is None else end) - start, start, end, first_line))
    by_rank: list[list[Part]] = [[] for _ in range(workers)]
    done = 0
    for part in parts:  # contiguous: the rank whose byte share holds the part's middle
        rank = min(workers - 1, int((done + part.num_bytes / 2) * workers / total)) if total else 0
        by_rank[rank].append(part)
        done += part.num_bytes
    return by_rank


class InputReader(PipelineStep):
    type = "📖 - READER"
    name = "lmforge inputs"

    def __init__(self, files: dict[str, str], work_dir: str | Path, *, text_field: str = "text",
                 txt_mode: str = "paragraph", show_progress: bool = True, parts: list[list[Part]] | None = None
                 ) -> None:
        super().__init__()
        self.files = files  # path -> source name
        self.work_dir = str(work_dir)
        self.text_field = text_field
        self.txt_mode = txt_mode
        self.show_progress = show_progress
        self.parts = parts  # per rank (plan_parts); None: whole files, dealt like plan_parts without splitting

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        parts = (self.parts if self.parts is not None else
                 plan_parts(list(self.files), world_size, txt_mode=self.txt_mode, split_bytes=1 << 62))[rank]
        stats = ReadStats(max_examples=1000)
        problems: list[str] = []
        counts: Counter[str] = Counter()
        bar = tqdm(total=sum(p.num_bytes for p in parts), unit="B", unit_scale=True,
                   desc=f"read rank {rank}", position=rank, leave=False, disable=not self.show_progress)
        for part in parts:
            path = part.path
            if part.start == 0:  # the file's first part counts the file
                counts["files"] += 1
                if os.path.getsize(path) == 0:
                    counts["problem/empty file"] += 1
                    problems.append(f"{path}: empty file")
            try:
                docs = (iter_documents([path], text_field=self.text_field, txt_mode=self.txt_mode, stats=stats)
                        if part.is_whole else
                        iter_span(path, part.start, part.end, part.first_line, text_field=self.text_field,
                                  txt_mode=self.txt_mode, stats=stats))
                for doc in docs:
                    counts["documents"] += 1
                    counts[length_key(doc.text)] += 1
                    yield Document(text=doc.text, id=f"{doc.source}:{doc.line}",
                                   metadata={"file": doc.source, "line": doc.line, "source": self.files[path]})
            except DataError as err:  # the whole file is unreadable: say so, go on with the next one
                counts["problem/file_error"] += 1
                problems.append(str(err))
            bar.update(part.num_bytes)
        bar.close()
        for fstats in stats.files.values():
            for reason, n in fstats.skip_reasons.items():
                counts[f"problem/{reason}"] += n
        problems = stats.examples + problems
        write_counts(self.work_dir, "read", rank, counts)
        # per file, this rank's share of it (the report adds up the shares of a file read by several ranks)
        per_file = {p: {"num_documents": stats.file(p).num_documents, "num_skipped": stats.file(p).num_skipped}
                    for p in dict.fromkeys(part.path for part in parts)}
        (Path(self.work_dir) / "files").mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(self.work_dir) / "files" / f"{rank:05d}.json", json.dumps(per_file))
        out = Path(self.work_dir) / "problems"
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / f"{rank:05d}.txt", "".join(p + "\n" for p in problems))


def length_key(text: str) -> str:
    """Histogram bin of a document's length: floor(log2(chars)), so 1 KiB and 1 MiB documents fit one plot
    (the same bins as mixing.document_counts)."""
    return f"length_log2/{max(len(text), 1).bit_length() - 1}"


def doc_to_json(doc: Document) -> str:
    return json.dumps({"text": doc.text, "id": doc.id, "metadata": doc.metadata}, ensure_ascii=False)


class ShardReader(PipelineStep):
    """Reads `<folder>/<rank:05d>.jsonl.gz`, the shard the previous stage's rank wrote (none: no documents)."""

    type = "📖 - READER"
    name = "lmforge shard"

    def __init__(self, folder: str | Path) -> None:
        super().__init__()
        self.folder = str(folder)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        path = Path(self.folder) / f"{rank:05d}.jsonl.gz"
        if not path.is_file():
            return
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                yield Document(text=row["text"], id=row["id"], metadata=row["metadata"])


class ShardWriter(PipelineStep):
    """Writes every document to `<folder>/<rank:05d>.jsonl.gz` and passes it on."""

    type = "💽 - WRITER"
    name = "lmforge shard"

    def __init__(self, folder: str | Path) -> None:
        super().__init__()
        self.folder = str(folder)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        folder = Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{rank:05d}.jsonl.gz"
        tmp = folder / f".{rank:05d}.jsonl.gz.tmp"
        with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as fh:
            for doc in data:
                fh.write(doc_to_json(doc) + "\n")
                yield doc
        os.replace(tmp, final)
