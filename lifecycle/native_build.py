"""Build a C source into a shared library on first use, cached: the CPU kernels of serve/worker/kernels and
quant/kernels both load theirs with ctypes from here.

Why C and ctypes rather than torch C++ extensions: no torch headers, about a second to compile with
`cc -O3 -march=native -fopenmp`, no ninja and no libtorch ABI to match; OpenMP resolves to the libgomp torch has
already loaded (same soname), so kernels and torch share one thread pool. The cache lives under
`$LMFORGE_KERNEL_CACHE` (default ~/.cache/lmforge/kernels), keyed by the source, the flags, the compiler's
version and the CPU's feature flags (`-march=native` code must not travel to another CPU); a build is written to
a temporary name and renamed, so concurrent first uses are safe.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

CFLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")


def find_c_compiler() -> str | None:
    """$CC, else cc or gcc on PATH; None when there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build_shared_library(source: Path, library_name: str, compiler: str, cflags: tuple[str, ...] = CFLAGS) -> Path:
    """The cached library built from `source`; compiles it when missing. Raises subprocess.SubprocessError with the
    compiler's message when the build fails."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([source.read_text(), " ".join(cflags), version, platform.machine(),
                                    cpu_flags()]).encode()).hexdigest()[:16]
    root = Path(os.environ.get("LMFORGE_KERNEL_CACHE") or Path.home() / ".cache" / "lmforge" / "kernels")
    target = root / key / library_name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *cflags, str(source), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=120)
        if done.returncode:
            raise subprocess.SubprocessError(done.stderr.strip()[-800:])
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
