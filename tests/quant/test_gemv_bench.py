"""python -m quant.kernels.gemv_bench at toy size: both one-row kernels timed and checked against the exact one,
the A/B against another source, and its bad flags. No timing is asserted."""

from __future__ import annotations

import pytest

from quant import kernels
from quant.kernels import SOURCE
from quant.kernels.gemv_bench import KERNELS, bench, build, main


def test_gemv_bench_rows_and_ab(tmp_path):
    if kernels.load() is None:
        pytest.skip(f"no C kernels here: {kernels.status()}")
    other = tmp_path / "old.c"
    other.write_text(SOURCE.read_text() + "\n/* another version */\n")
    versions = {"current": kernels.load(), "against": build(other, "lmforge_lowbit_test_against.so")}
    rows = bench(versions, [(64, 256), (48, 96)], group=128, rounds=1, min_flops=1e5)
    assert [(r["n"], r["group"], r["version"], r["kernel"]) for r in rows] == [
        (n, g, v, kern) for n, g in ((64, 128), (48, 32)) for v in versions for kern in KERNELS]
    for r in rows:
        assert r["us"] > 0 and r["gb_per_s"] > 0
        if r["kernel"] == "q4_linear":
            assert r["rel_max_error_vs_exact"] < 1e-5
        else:  # int8 activations: rounded, but by about 1/127 of a block's largest value at most
            assert 0 < r["rel_max_error_vs_exact"] < 0.05


def test_gemv_bench_bad_flags(tmp_path):
    for argv, message in ((["--rounds", "0"], "--rounds"), (["--group", "48"], "--group"),
                          (["--against", str(tmp_path / "missing.c")], "--against")):
        with pytest.raises(SystemExit, match=message):
            main(argv)
    with pytest.raises(SystemExit, match="--output .*is a directory"):  # refused before any timing
        main(["--output", str(tmp_path)])
