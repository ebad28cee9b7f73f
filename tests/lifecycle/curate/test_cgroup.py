"""The memory cgroup the curation bench runs under (`--memory-limit-mb`): a real kernel limit, real children.

Skips, saying why, where this process may not create cgroups (no writable /sys/fs/cgroup): the limit is a
kernel feature, there is nothing to fake.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from lifecycle.data.curate.cgroup import MemoryCgroup
from lifecycle.errors import ConfigError

REASON = MemoryCgroup.available()
needs_cgroup = pytest.mark.skipif(REASON is not None, reason=f"cannot create a memory cgroup here: {REASON}")

ALLOCATE = "import sys; b = bytearray(int(sys.argv[1]) << 20); b[::4096] = b'x' * len(b[::4096]); print('ok')"


def _run(limit_mb: float, allocate_mb: int) -> tuple[subprocess.CompletedProcess, dict]:
    with MemoryCgroup(limit_mb) as cg:
        proc = subprocess.run([sys.executable, "-c", ALLOCATE, str(allocate_mb)], capture_output=True, text=True,
                              preexec_fn=cg.add_self, timeout=120)
        stats = cg.stats()
    assert not cg.path.exists(), "the cgroup is removed on exit"
    return proc, stats


@needs_cgroup
def test_a_child_under_its_limit_runs_and_its_exact_peak_is_reported() -> None:
    proc, stats = _run(limit_mb=200, allocate_mb=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    assert stats["limit_mb"] == 200.0 and stats["oom_kills"] == 0
    assert 60 <= stats["peak_mb"] <= 200, stats  # the 60 MB it touched, the interpreter, at most the limit


@needs_cgroup
def test_a_child_over_its_limit_is_oom_killed_and_that_is_counted() -> None:
    proc, stats = _run(limit_mb=80, allocate_mb=300)
    assert proc.returncode == -9, (proc.returncode, proc.stderr)
    assert stats["oom_kills"] >= 1 and stats["peak_mb"] <= 80.5, stats


def test_a_limit_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="must be > 0"):
        MemoryCgroup(0)


@needs_cgroup
def test_bench_memory_runs_the_curation_under_the_limit_and_reports_it(shared_data, tmp_path) -> None:
    """`lmforge bench curate --parts memory --memory-limit-mb`: both runs inside the cgroup (its exact peak is
    what the tree charged: below the limit, and at least the main process's own anonymous heap), no OOM kill."""
    from lifecycle.data.curate.bench import bench_memory, to_markdown

    result = bench_memory(shared_data, tmp_path, size_mb=1, workers=2, small_mb=0.5, memory_limit_mb=1024,
                          curate_args=("--disable", "langid", "--disable", "quality"))
    assert result["memory_limit_mb"] == 1024
    for label in ("small", "large"):
        c = result[label]["cgroup"]
        assert c["limit_mb"] == 1024.0 and c["oom_kills"] == 0, c
        assert 100 < c["peak_mb"] <= 1024.0, c  # python + torch + datatrove imported in the tree, charged here
        assert result[label]["outcome"]["read"] == result[label]["documents"]
    assert "cgroup limit" in to_markdown({"memory": result})
