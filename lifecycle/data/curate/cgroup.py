"""A hard memory limit for a child process tree: a Linux memory cgroup (v1 or v2), for the curation bench.

"Memory stays bounded on inputs larger than RAM" is shown best by giving a run less RAM than its input: the
bench starts `lmforge curate run` inside a fresh memory cgroup whose limit is below the input size. The kernel
then enforces the limit on everything the tree charges: anonymous memory *and* page cache (the input it reads,
the work files it writes), reclaiming cache when the limit is reached and OOM-killing a process only when
reclaim cannot make room (`oom_kills`). `peak_mb` is the cgroup's own high-water mark (v1
`memory.max_usage_in_bytes`, v2 `memory.peak`), exact, not sampled; it includes page cache, so a run that reads
more than the limit shows a peak near the limit by design — the verdict is that it finished with no OOM kill.

Needs write access to the cgroup filesystem (root in a container that mounts it writable; on a systemd host,
a delegated subtree). `MemoryCgroup.available()` says whether this process has it, and why not.
"""

from __future__ import annotations

import os
from pathlib import Path

from lifecycle.errors import ConfigError

ROOT = Path("/sys/fs/cgroup")


def _own_path(controller: str | None) -> str:
    """This process's cgroup path in the v1 hierarchy holding `controller` (or the v2 path when None)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        if controller is None and number == "0" and controllers == "":
            return path
        if controller is not None and controller in controllers.split(","):
            return path
    raise ConfigError(f"/proc/self/cgroup: no {'v2' if controller is None else controller} entry")


def _locate() -> tuple[int, Path]:
    """(version, parent directory to create the child cgroup in)."""
    v1 = ROOT / "memory"
    if (v1 / "memory.limit_in_bytes").exists():
        own = v1 / _own_path("memory").lstrip("/")
        return 1, own if own.is_dir() else v1
    controllers = ROOT / "cgroup.controllers"
    if controllers.exists():
        own = ROOT / _own_path(None).lstrip("/")
        parent = own if (own / "cgroup.subtree_control").exists() else ROOT
        if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
            raise ConfigError(f"{parent}/cgroup.subtree_control: the memory controller is not enabled for children")
        return 2, parent
    raise ConfigError(f"{ROOT}: no memory cgroup (neither v1 {v1} nor a v2 hierarchy)")


class MemoryCgroup:
    """A new memory cgroup with a hard limit; `add_self()` (for Popen's preexec_fn) moves the calling
    process into it, so everything it forks is charged there too. Use as a context manager; `stats()` after
    the tree has exited."""

    def __init__(self, limit_mb: float, name: str | None = None) -> None:
        if limit_mb <= 0:
            raise ConfigError(f"memory limit: {limit_mb} MB must be > 0")
        self.limit_bytes = int(limit_mb * 1024 * 1024)
        self.version, parent = _locate()
        self.path = parent / (name or f"lmforge-bench-{os.getpid()}")
        self._procs = str(self.path / "cgroup.procs")

    @staticmethod
    def available() -> str | None:
        """None if a limited cgroup can be made here, else why not."""
        try:
            with MemoryCgroup(64, name=f"lmforge-probe-{os.getpid()}"):
                pass
        except (ConfigError, OSError) as exc:
            return str(exc)
        return None

    def _write(self, name: str, value: str) -> None:
        (self.path / name).write_text(value)

    def _read(self, name: str) -> str | None:
        try:
            return (self.path / name).read_text()
        except OSError:
            return None

    def __enter__(self) -> MemoryCgroup:
        try:
            self.path.mkdir()
        except OSError as exc:
            raise ConfigError(f"cannot create the memory cgroup {self.path}: {exc.strerror}") from exc
        try:
            if self.version == 1:
                self._write("memory.limit_in_bytes", str(self.limit_bytes))
                if (self.path / "memory.memsw.limit_in_bytes").exists():  # no swapping out to get under the limit
                    self._write("memory.memsw.limit_in_bytes", str(self.limit_bytes))
            else:
                self._write("memory.max", str(self.limit_bytes))
                if (self.path / "memory.swap.max").exists():
                    self._write("memory.swap.max", "0")
        except OSError as exc:
            self.path.rmdir()
            raise ConfigError(f"cannot set the limit of {self.path}: {exc.strerror}") from exc
        return self

    def add_self(self) -> None:
        """Move the calling process into the cgroup (safe in a preexec_fn: one write, no allocation-heavy code)."""
        with open(self._procs, "w") as f:
            f.write(str(os.getpid()))

    def stats(self) -> dict[str, float | int]:
        """Limit, exact peak usage (anonymous + page cache: at the limit when cache filled it and was reclaimed),
        OOM kills. (Not v1's failcnt: kernels that reclaim before failing a charge leave it at 0 at the limit.)"""
        if self.version == 1:
            peak = int(self._read("memory.max_usage_in_bytes") or 0)
            events = dict(line.split() for line in (self._read("memory.oom_control") or "").splitlines() if line)
        else:
            peak = int(self._read("memory.peak") or 0)  # kernel >= 5.19
            events = dict(line.split() for line in (self._read("memory.events") or "").splitlines() if line)
        return {"cgroup_version": self.version, "limit_mb": round(self.limit_bytes / 2**20, 1),
                "peak_mb": round(peak / 2**20, 1), "oom_kills": int(events.get("oom_kill", 0))}

    def __exit__(self, *exc: object) -> None:
        try:
            self.path.rmdir()  # every process has exited; charged page cache moves to the parent
        except OSError:
            pass
