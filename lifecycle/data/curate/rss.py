"""Peak memory of a whole process tree, sampled from /proc (Linux; stdlib only, no psutil).

A curation run is a main process plus datatrove's worker processes (forked per stage), so neither the
main process's own `ru_maxrss` nor RUSAGE_CHILDREN (the largest single child, and only once it was
waited for) says what the run held at once. `TreeSampler` walks the tree under one pid every
`interval` seconds and keeps the peaks of:

- rss_mb:  the sum of VmRSS over the tree. It over-counts pages that forked workers share with the
           main process (copy-on-write: each process reports them), so it is an upper bound;
- anon_mb: the sum of RssAnon: heap memory, the part that cannot be dropped under pressure (RssFile,
           pages of memory-mapped files such as the MinHash signatures, is page cache the kernel reclaims);
           also over-counts what forked workers still share with their parent;
- pss_mb:  the sum of Pss (smaps_rollup): each shared page divided among the processes sharing it, so
           this is what the tree holds at once, with nothing counted twice;
- largest_process_mb: the largest VmHWM (a process's own peak RSS, kept by the kernel, so it is exact
           even between samples);
- processes: the most processes seen at once.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

PROC = Path("/proc")


def _parents() -> dict[int, int]:
    """pid -> parent pid for every process visible now."""
    out = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited between the listing and the read
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")"
        out[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def process_tree(root: int) -> list[int]:
    """root and all its descendants alive now."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, VmHWM and Pss of one process in KiB ({} once it has exited)."""
    out = {}
    for name, keys in (("status", ("VmRSS", "RssAnon", "RssFile", "VmHWM")), ("smaps_rollup", ("Pss",))):
        try:
            lines = (PROC / str(pid) / name).read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            key, _, value = line.partition(":")
            if key in keys:
                out[key] = int(value.split()[0])
    return out


class TreeSampler(threading.Thread):
    """Samples the memory of the process tree under `pid` until stop(); `peaks()` gives the maxima in MB."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self._stop_event = threading.Event()
        self.samples = 0
        self._peak = {"rss_mb": 0.0, "anon_mb": 0.0, "pss_mb": 0.0, "largest_process_mb": 0.0, "processes": 0}

    def sample(self) -> None:
        rss = anon = pss = 0
        pids = process_tree(self.pid) if os.path.exists(PROC / str(self.pid)) else []
        for pid in pids:
            m = memory_kb(pid)
            rss += m.get("VmRSS", 0)
            anon += m.get("RssAnon", 0)
            pss += m.get("Pss", 0)
            self._peak["largest_process_mb"] = max(self._peak["largest_process_mb"], m.get("VmHWM", 0) / 1024)
        self._peak["rss_mb"] = max(self._peak["rss_mb"], rss / 1024)
        self._peak["anon_mb"] = max(self._peak["anon_mb"], anon / 1024)
        self._peak["pss_mb"] = max(self._peak["pss_mb"], pss / 1024)
        self._peak["processes"] = max(self._peak["processes"], len(pids))
        self.samples += 1

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> dict[str, float]:
        self._stop_event.set()
        self.join()
        return self.peaks()

    def peaks(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in self._peak.items()} | {"samples": self.samples,
                                                                  "interval_s": self.interval}
