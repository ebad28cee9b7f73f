"""One-row (decode) 4-bit GEMV kernels, timed alone: µs per call and GB/s of packed weights, one thread, CPU time.

The kernel-level companion of quant/cpu_time_bench.py (which times whole decode steps): each kernel of
`lowbit.c` that serves one row — the exact one (`q4_linear`, fp32 activations) and the int8-activation one
(`q4_linear_int8_activations`, LMFORGE_Q4_ACTIVATIONS=int8) — on the projection shapes of the `small` and `base`
presets, with random codes. `--against OLD.c` builds another version of the source beside the current one and
times both in the same run, interleaved (an A/B of a kernel change: `git show HEAD~1:quant/kernels/lowbit.c >
/tmp/old.c`). The weights of the smaller shapes stay in cache between calls; the `base` LM head (12 MB packed)
comes from L3. Each kernel's output is checked against the current exact kernel's (relative max error), so a
faster but wrong kernel shows.

    python -m quant.kernels.gemv_bench --output runs/bench/gemv.json
    python -m quant.kernels.gemv_bench --against /tmp/old.c
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time
from pathlib import Path

import torch

from lifecycle.data.manifest import check_output_file
from lifecycle.errors import ConfigError
from lifecycle.native_build import build_shared_library, find_c_compiler
from quant import kernels
from quant.kernels import CFLAGS, LowbitKernels

# (N, K): `base` qkv, o, gate_up, down, LM head; `small` gate_up and down.
SHAPES = [(1280, 768), (768, 768), (4096, 768), (768, 2048), (32000, 768), (2752, 512), (512, 1376)]
KERNELS = ("q4_linear", "q4_linear_int8_activations")


def build(source: Path, name: str) -> LowbitKernels:
    """Another version of lowbit.c, built (and cached) as quant.kernels builds the current one."""
    compiler = find_c_compiler()
    if compiler is None:
        raise SystemExit("error: no C compiler (cc/gcc) on PATH")
    return LowbitKernels(ctypes.CDLL(str(build_shared_library(source, name, compiler, tuple(CFLAGS)))))


def time_call(fn, args: tuple, min_flops: float, rounds: int) -> float:
    """Best of `rounds` of the mean CPU µs per call (enough calls per round for ~min_flops multiply-adds)."""
    n, k = args[1].shape[0], args[1].shape[1] * 2
    reps = max(5, int(min_flops // (n * k)))
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(reps):
            fn(*args)
        best = min(best, (time.process_time() - start) / reps * 1e6)
    return best


def bench(versions: dict[str, LowbitKernels], shapes: list[tuple[int, int]], group: int = 128, rounds: int = 5,
          min_flops: float = 2e8) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        rows = []
        for n, k in shapes:
            g = group if k % group == 0 else 32
            qw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
            scale = torch.rand(n, k // g, generator=gen) * 0.01
            offset = -8 * scale
            x = torch.randn(1, k, generator=gen)
            args = (x, qw, scale, offset, g)
            reference = next(iter(versions.values())).q4_linear(*args)
            packed_mb = (n * k / 2 + n * (k // g) * 8) / 1e6
            for version, lib in versions.items():
                for kernel in KERNELS:
                    fn = getattr(lib, kernel)
                    err = ((fn(*args) - reference).abs().max() / reference.abs().max()).item()
                    us = time_call(fn, args, min_flops, rounds)
                    rows.append({"n": n, "k": k, "group": g, "version": version, "kernel": kernel, "us": us,
                                 "gb_per_s": packed_mb / us * 1e3, "rel_max_error_vs_exact": err})
        return rows
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m quant.kernels.gemv_bench", description=__doc__.split("\n\n")[0],
                                 epilog="example: python -m quant.kernels.gemv_bench --against /tmp/old.c "
                                        "--output runs/bench/gemv.json")
    ap.add_argument("--against", type=Path, default=None, help="another lowbit.c to time beside the current one")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per kernel and shape (the best is reported)")
    ap.add_argument("--group", type=int, default=128, help="group size (32 where it does not divide K)")
    ap.add_argument("--output", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit(f"error: --rounds: {args.rounds}: must be at least 1")
    if args.group % 32:
        raise SystemExit(f"error: --group: {args.group}: must be a multiple of 32")
    if args.output:
        try:
            check_output_file(Path(args.output), "--output")
        except ConfigError as err:
            raise SystemExit(f"error: {err}") from None
    current = kernels.load()  # the library the engine uses
    if current is None:
        raise SystemExit(f"error: no low-bit kernels here: {kernels.status()}")
    versions = {"current": current}
    if args.against is not None:
        if not args.against.is_file():
            raise SystemExit(f"error: --against: {args.against}: no such file")
        versions["against"] = build(args.against, "lmforge_lowbit_against.so")
    rows = bench(versions, SHAPES, group=args.group, rounds=args.rounds)
    print(f"{'N x K':>12} {'version':8} {'kernel':28} {'µs':>9} {'GB/s':>6} {'rel err':>8}")
    for r in rows:
        print(f"{r['n']:>6} x {r['k']:<4} {r['version']:8} {r['kernel']:28} {r['us']:9.1f} {r['gb_per_s']:6.2f} "
              f"{r['rel_max_error_vs_exact']:8.1e}")
    if args.output:
        from quant.report import atomic_write

        atomic_write(Path(args.output), json.dumps({"threads": 1, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
