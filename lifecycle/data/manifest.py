"""DatasetManifest: the typed object that crosses from data preparation to training.

It records what went into a dataset (each source file's sha256, size and document counts), what
was taken out (counts per filter rule), and free-form facts downstream stages depend on (tokenizer
hash, seq_len, mixture weights) under `extra`. A checkpoint stores `content_hash()`, so a model can
always be traced back to the exact bytes it was trained on; the hash ignores file paths so moving
a data directory does not change it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lifecycle.data.readers import ReadStats
from lifecycle.errors import ConfigError, DataError

FORMAT_NAME = "lmforge-dataset"
FORMAT_VERSION = 1


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in `chunk`-byte blocks so size does not matter."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def umask() -> int:
    """The process's umask, read without changing it (Linux: /proc; elsewhere set-and-restore)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode `open(path, "w")` would give a new file: 0o666 less the umask (0o644 under the usual 022).
    Temporary files (mkstemp, and transformers' own save of model.safetensors) are 0o600: published as they are,
    a checkpoint or report is unreadable to every other user, e.g. the serving container's."""
    return 0o666 & ~umask()


def check_output_file(path: str | Path, flag: str = "--output") -> None:
    """Refuse, before the work whose result it will hold, an output file path that names a directory (the final
    write would fail only after all the work)."""
    if Path(path).is_dir():
        raise ConfigError(f"{flag} {path}: is a directory; give the path of the file to write")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` so readers see the old file or the new one, never half of one.

    The temporary file lives in the same directory because `os.replace` is only atomic within one
    filesystem; it is fsynced before the rename so a crash cannot leave an empty file in place.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, default_file_mode())  # mkstemp's 0o600 would outlive the rename
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class SourceInfo:
    """One input file as it was when the dataset was built."""

    path: str
    sha256: str
    num_bytes: int
    num_documents: int
    num_skipped: int

    @classmethod
    def from_file(cls, path: str | Path, *, num_documents: int, num_skipped: int) -> SourceInfo:
        path = Path(path)
        return cls(path=str(path), sha256=sha256_file(path), num_bytes=path.stat().st_size,
                   num_documents=num_documents, num_skipped=num_skipped)


def sources_from_stats(stats: ReadStats) -> list[SourceInfo]:
    """SourceInfo for every file a reader went through, in reading order, with its counts."""
    return [SourceInfo.from_file(path, num_documents=s.num_documents, num_skipped=s.num_skipped)
            for path, s in stats.files.items()]


@dataclass
class DatasetManifest:
    """What a dataset is made of. Saved as JSON beside the data; loaded by training."""

    sources: list[SourceInfo]
    num_documents: int
    num_tokens: int | None = None
    removed: dict[str, int] = field(default_factory=dict)  # documents removed, per rule or reason
    extra: dict[str, Any] = field(default_factory=dict)  # tokenizer hash, seq_len, mixture, ...

    def content_hash(self) -> str:
        """sha256 of a canonical JSON of everything but the source paths.

        Keys are sorted at every depth, so dict order never matters; the order of `sources` does,
        because it is the order documents were read in.
        """
        payload = {
            "sources": [[s.sha256, s.num_bytes, s.num_documents, s.num_skipped] for s in self.sources],
            "num_documents": self.num_documents,
            "num_tokens": self.num_tokens,
            "removed": self.removed,
            "extra": self.extra,
        }
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **asdict(self),
                "content_hash": self.content_hash()}

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> DatasetManifest:
        """Read and check a saved manifest; every problem names the file and the field."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise DataError(f"{path}: no such dataset manifest; prepare the dataset first") from err
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text (byte offset {err.start}); not a dataset manifest") from err
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON at column {err.colno}: {err.msg}; "
                            "the manifest is corrupt, re-create the dataset") from err
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "<manifest>") -> DatasetManifest:
        if not isinstance(data, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("format", FORMAT_NAME) != FORMAT_NAME:
            raise DataError(f"{where}: format is {data['format']!r}, not {FORMAT_NAME!r}; not a dataset manifest")
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise DataError(f"{where}: format_version {version!r} is not supported (expected {FORMAT_VERSION}); "
                            "upgrade lmforge or re-create the dataset")
        known = {f.name for f in fields(cls)} | {"format", "format_version", "content_hash"}
        if unknown := sorted(set(data) - known):
            raise DataError(f"{where}: unknown keys {', '.join(unknown)}")
        raw_sources = _require(data, "sources", list, where)
        sources = []
        for i, raw in enumerate(raw_sources):
            at = f"{where}: sources[{i}]"
            if not isinstance(raw, dict):
                raise DataError(f"{at}: expected an object, got {type(raw).__name__}")
            sources.append(SourceInfo(**{f.name: _require(raw, f.name, str if f.type == "str" else int, at)
                                         for f in fields(SourceInfo)}))
        num_tokens = data.get("num_tokens")
        if num_tokens is not None:
            num_tokens = _require(data, "num_tokens", int, where)
        removed = _require(data, "removed", dict, where) if "removed" in data else {}
        for key, count in removed.items():
            if not isinstance(count, int) or isinstance(count, bool):
                raise DataError(f"{where}: removed[{key!r}] must be an integer count, got {count!r}")
        manifest = cls(sources=sources, num_documents=_require(data, "num_documents", int, where),
                       num_tokens=num_tokens, removed=removed,
                       extra=_require(data, "extra", dict, where) if "extra" in data else {})
        stored = data.get("content_hash")
        if stored is not None and stored != manifest.content_hash():
            raise DataError(f"{where}: content_hash {stored} does not match the contents "
                            f"({manifest.content_hash()}); the manifest was edited, re-create the dataset")
        return manifest


def _require(data: dict[str, Any], key: str, tp: type, where: str) -> Any:
    """`data[key]`, checked to be a `tp` (bool is not accepted as an int)."""
    if key not in data:
        raise DataError(f"{where}: missing key {key!r}")
    value = data[key]
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise DataError(f"{where}: {key!r} must be {tp.__name__}, got {type(value).__name__}")
    return value
