"""CurateStep: the base of our blocks, a datatrove PipelineStep that accounts for what it did.

Every block reads a stream of datatrove `Document`s and yields the ones it keeps, possibly changed.
For each document it decides one of: kept as is, kept but changed (with a reason: "html", "email"),
or removed (with a reason: "language_de", "gopher_short_document"). Counts per reason are written
per rank to `<work>/counts/<block>/<rank>.json` when the rank finishes, and the first
`samples_per_reason` removed documents per reason to `<work>/samples/<block>/<rank>.jsonl`, so the
report can show a person what each rule ate. Because these land only when a rank completes, a
rank that is killed and rerun (datatrove's `skip_completed`) overwrites its partial files.

Call order, as datatrove drives it: `run(data, rank, world_size)` once per rank, in a worker process;
subclasses implement `process(doc) -> Verdict` and may override `setup()` (called once per rank
before the first document: load models there, not in `__init__`, so the step pickles cheaply).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from lifecycle.data.manifest import atomic_write_text

SAMPLE_CHARS = 600  # a removed document is shown up to this many characters


@dataclass
class Verdict:
    """What a block decided about one document."""

    keep: bool = True
    reason: str | None = None  # why it was removed (keep=False)
    changes: Counter[str] = field(default_factory=Counter)  # what was changed, how many times
    tags: tuple[str, ...] = ()  # counted whatever the decision ("detected/zh")

    @classmethod
    def remove(cls, reason: str, tags: tuple[str, ...] = ()) -> Verdict:
        return cls(keep=False, reason=reason, tags=tags)



class CurateStep(PipelineStep):
    """A block with counts and samples. `block` names it in the manifest and report."""

    type = "🧹 - CURATE"
    block = "step"

    def __init__(self, work_dir: str | Path, samples_per_reason: int = 5) -> None:
        super().__init__()
        self.work_dir = str(work_dir)
        self.samples_per_reason = samples_per_reason

    def setup(self) -> None:  # noqa: B027 - an optional hook
        """Load what the block needs, once per rank (in the worker process)."""

    def process(self, doc: Document) -> Verdict:
        raise NotImplementedError

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self.setup()
        counts: Counter[str] = Counter()
        samples: list[dict] = []
        sampled: Counter[str] = Counter()
        for doc in data:
            with self.track_time():
                verdict = self.process(doc)
            counts["in"] += 1
            counts.update(verdict.tags)
            if verdict.keep:
                counts["out"] += 1
                for change, n in verdict.changes.items():
                    counts[f"changed/{change}"] += n
                    counts[f"changed_docs/{change}"] += 1
                self.stat_update("forwarded")
                yield doc
                continue
            reason = verdict.reason or "unspecified"
            counts[f"removed/{reason}"] += 1
            self.stat_update("dropped", f"dropped_{reason}")
            if sampled[reason] < self.samples_per_reason:
                sampled[reason] += 1
                samples.append({"block": self.block, "reason": reason, "id": doc.id,
                                "text": doc.text[:SAMPLE_CHARS], "num_chars": len(doc.text)})
        self.finish(rank, counts, samples)

    def finish(self, rank: int, counts: Counter[str], samples: list[dict]) -> None:
        write_counts(self.work_dir, self.block, rank, counts)
        out = Path(self.work_dir) / "samples" / self.block
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / f"{rank:05d}.jsonl",
                          "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))


def write_counts(work_dir: str | Path, block: str, rank: int, counts: Counter[str] | dict) -> None:
    out = Path(work_dir) / "counts" / block
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{rank:05d}.json", json.dumps(dict(counts), sort_keys=True, ensure_ascii=False))


def read_counts(work_dir: str | Path, block: str) -> Counter[str]:
    """The block's counts summed over ranks."""
    total: Counter[str] = Counter()
    for path in sorted((Path(work_dir) / "counts" / block).glob("*.json")):
        total.update(json.loads(path.read_text(encoding="utf-8")))
    return total


def read_samples(work_dir: str | Path, block: str) -> list[dict]:
    rows: list[dict] = []
    for path in sorted((Path(work_dir) / "samples" / block).glob("*.jsonl")):
        rows += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return rows


class Guarded(CurateStep):
    """Accounts for a stock datatrove step that only removes documents (its dedup filters).

    The inner step yields the documents it keeps, the same objects in the same order; whatever went in
    and did not come out before the next kept one was removed, for `reason`.
    """

    def __init__(self, inner: PipelineStep, block: str, reason: str, work_dir: str | Path,
                 samples_per_reason: int = 5) -> None:
        super().__init__(work_dir, samples_per_reason)
        self.inner = inner
        self.block = block
        self.reason = reason
        self.name = f"{inner.name} (counted)"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from collections import deque

        pending: deque[Document] = deque()
        counts: Counter[str] = Counter()
        samples: list[dict] = []

        def feed():
            for doc in data:
                pending.append(doc)
                counts["in"] += 1
                yield doc

        def removed(doc: Document) -> None:
            counts[f"removed/{self.reason}"] += 1
            if len(samples) < self.samples_per_reason:
                samples.append({"block": self.block, "reason": self.reason, "id": doc.id,
                                "text": doc.text[:SAMPLE_CHARS], "num_chars": len(doc.text)})

        for kept in self.inner.run(feed(), rank, world_size):
            while pending and pending[0] is not kept:
                removed(pending.popleft())
            if pending:
                pending.popleft()
            counts["out"] += 1
            yield kept
        while pending:
            removed(pending.popleft())
        self.finish(rank, counts, samples)
