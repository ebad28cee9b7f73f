"""Reading raw inputs into datatrove Documents, and intermediate/final shards in and out.

`InputReader` is the first step of the pipeline: rank r of W reads files r, r+W, ... through
lifecycle.data.readers, which skips and counts bad records (invalid JSON line, invalid UTF-8, binary
junk, missing text field) with file and line and keeps every good record next to a bad one. A file
that cannot be read at all (a .json that does not parse, a csv without the text column) is counted
as "file_error" with its message and the run goes on with the next file.

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
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from tqdm import tqdm

from lifecycle.data.curate.step import write_counts
from lifecycle.data.manifest import atomic_write_text
from lifecycle.data.readers import ReadStats, expand_inputs, iter_documents
from lifecycle.errors import DataError


def source_names(inputs: Sequence[str | Path]) -> dict[str, str]:
    """file path -> source name (the name of the input, file or directory, it was found under)."""
    names: dict[str, str] = {}
    for raw in inputs:
        name = Path(raw).name or str(raw)
        for path in expand_inputs([raw]):
            names.setdefault(str(path), Path(name).stem if Path(raw).is_file() else name)
    return names


class InputReader(PipelineStep):
    type = "📖 - READER"
    name = "lmforge inputs"

    def __init__(self, files: dict[str, str], work_dir: str | Path, *, text_field: str = "text",
                 txt_mode: str = "paragraph", show_progress: bool = True) -> None:
        super().__init__()
        self.files = files  # path -> source name
        self.work_dir = str(work_dir)
        self.text_field = text_field
        self.txt_mode = txt_mode
        self.show_progress = show_progress

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        paths = sorted(self.files)[rank::world_size]
        stats = ReadStats(max_examples=1000)
        problems: list[str] = []
        counts: Counter[str] = Counter()
        bar = tqdm(total=sum(os.path.getsize(p) for p in paths), unit="B", unit_scale=True,
                   desc=f"read rank {rank}", position=rank, leave=False, disable=not self.show_progress)
        for path in paths:
            counts["files"] += 1
            if os.path.getsize(path) == 0:
                counts["problem/empty file"] += 1
                problems.append(f"{path}: empty file")
            try:
                for doc in iter_documents([path], text_field=self.text_field, txt_mode=self.txt_mode,
                                          stats=stats):
                    counts["documents"] += 1
                    counts[length_key(doc.text)] += 1
                    yield Document(text=doc.text, id=f"{doc.source}:{doc.line}",
                                   metadata={"file": doc.source, "line": doc.line, "source": self.files[path]})
            except DataError as err:  # the whole file is unreadable: say so, go on with the next one
                counts["problem/file_error"] += 1
                problems.append(str(err))
            bar.update(os.path.getsize(path))
        bar.close()
        for fstats in stats.files.values():
            for reason, n in fstats.skip_reasons.items():
                counts[f"problem/{reason}"] += n
        problems = stats.examples + problems
        write_counts(self.work_dir, "read", rank, counts)
        per_file = {p: {"num_documents": stats.file(p).num_documents, "num_skipped": stats.file(p).num_skipped}
                    for p in paths}
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
