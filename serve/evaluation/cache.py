"""ResultCache: every finished item appended to a JSON Lines file, so a killed run resumes where it stopped.

One line per item: {"run": run key, "index", "where", "key", "answer", "metrics"}. The run key hashes the
task (serve/evaluation/task.py `spec_fingerprint`) and the model's identity (the target's description), so
answers of another model or another prompt are never reused; an item's `key` hashes its request, so an
item whose data or template changed is asked again. A run killed mid-write leaves at most one partial
last line: it is ignored on load, and the next append starts on a fresh line.

Lines are flushed as written (a killed process loses nothing the OS has accepted); not fsynced (a power
loss may cost the last few items, which are then simply asked again).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from serve.evaluation.items import EvalItem
from serve.evaluation.results import ItemResult, answer_from_json, item_metrics
from serve.evaluation.task import TaskSpec, spec_fingerprint


def run_key(spec: TaskSpec, target_description: dict[str, Any]) -> str:
    """The model is its checkpoint manifest's hash when the server reports one (so a restarted server on
    another port still matches), else its name at that address."""
    identity = {k: target_description.get(k) for k in ("model", "manifest_sha256", "api")}
    if identity["manifest_sha256"] is None:
        identity["target"] = target_description.get("target")
    payload = json.dumps({"task": spec_fingerprint(spec), "model": identity}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class ResultCache:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fh: Any = None

    def load(self, key: str, spec: TaskSpec, items: Sequence[EvalItem]) -> dict[int, ItemResult]:
        """Cached results of this run's items (the same request at the same index), by item index."""
        if not self.path.is_file():
            return {}
        by_index = {item.index: item for item in items}
        found: dict[int, ItemResult] = {}
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the partial last line of a killed run
                item = by_index.get(entry.get("index")) if entry.get("run") == key else None
                if item is None or entry.get("key") != item.key():
                    continue
                answer = answer_from_json(item, entry["answer"])
                found[item.index] = ItemResult(item, answer, item_metrics(spec, item, answer))
        return found

    def append(self, key: str, result: ItemResult) -> None:
        line = json.dumps({"run": key, **result.to_json()}, ensure_ascii=False) + "\n"
        with self._lock:
            if self._fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                needs_newline = self.path.is_file() and self.path.stat().st_size > 0 and not self._ends_with_newline()
                self._fh = open(self.path, "a", encoding="utf-8")
                if needs_newline:
                    self._fh.write("\n")
            self._fh.write(line)
            self._fh.flush()

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as fh:
            fh.seek(-1, 2)
            return fh.read(1) == b"\n"

    def clear(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
            self.path.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
