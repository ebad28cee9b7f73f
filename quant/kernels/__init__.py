"""quant's CPU kernels (`lowbit.c`): 4-bit, 8-bit and NF4 weight-only linears for the few rows of decode.

Built on first use with the system C compiler and loaded with ctypes, as serve/worker/kernels (same reasons:
no torch headers, about a second to compile, OpenMP shares torch's libgomp). Cached under
`$LMFORGE_KERNEL_CACHE` (default ~/.cache/lmforge/kernels) keyed by source, flags, compiler and CPU flags;
written to a temporary name and renamed. Optional: without a compiler, or with LMFORGE_CPU_KERNELS=0, `load()`
returns None, `status()` says why, and quant/linear.py uses torch's ops.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
from pathlib import Path

import torch

from lifecycle.native_build import build_shared_library, find_c_compiler

SOURCE = Path(__file__).with_name("lowbit.c")
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
MAX_M = 8  # rows per call (decode); more rows go to tiled_linear (dequantize a tile + torch GEMM wins there)
TILE_BYTES = 2 << 20  # fp32 tile of dequantized weight rows per GEMM in tiled_linear (measured: docs/BENCHMARKS.md)

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_lock = threading.Lock()
_state: dict[str, object] = {}


class LowbitKernels:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self._q4 = lib.lmfq_q4_linear_f32
        self._q4.restype, self._q4.argtypes = None, [_ptr] * 6 + [_i64] * 4 + [_int]
        self._q4q8 = lib.lmfq_q4_linear_q8act_f32
        self._q4q8.restype, self._q4q8.argtypes = None, [_ptr] * 6 + [_i64] * 3 + [_int]
        self._q8 = lib.lmfq_q8_linear_f32
        self._q8.restype, self._q8.argtypes = None, [_ptr] * 6 + [_i64] * 3 + [_int]
        self._nf4 = lib.lmfq_nf4_linear_f32
        self._nf4.restype, self._nf4.argtypes = None, [_ptr] * 6 + [_i64] * 4 + [_int]
        self._q4_dequant = lib.lmfq_q4_dequant_f32
        self._q4_dequant.restype, self._q4_dequant.argtypes = None, [_ptr] * 4 + [_i64] * 4 + [_int]
        self._q8_dequant = lib.lmfq_q8_dequant_f32
        self._q8_dequant.restype, self._q8_dequant.argtypes = None, [_ptr] * 4 + [_i64] * 3 + [_int]
        self._nf4_dequant = lib.lmfq_nf4_dequant_f32
        self._nf4_dequant.restype, self._nf4_dequant.argtypes = None, [_ptr] * 4 + [_i64] * 4 + [_int]

    def q4_linear(self, x: torch.Tensor, qw: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                  group: int, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (m <= MAX_M, k) fp32; qw (n, k / 2) uint8; scale/offset (n, k / group) fp32 -> (m, n)."""
        m, k = x.shape
        n = qw.shape[0]
        if not (m <= MAX_M and x.dtype == torch.float32 and x.is_contiguous() and qw.shape[1] * 2 == k
                and qw.dtype == torch.uint8 and qw.is_contiguous() and group % 32 == 0 and k % group == 0
                and scale.shape == offset.shape == (n, k // group) and scale.is_contiguous() and offset.is_contiguous()
                and scale.dtype == offset.dtype == torch.float32 and (bias is None or bias.is_contiguous())):
            raise ValueError("q4_linear: bad shapes or dtypes")
        out = torch.empty(m, n, dtype=torch.float32)
        self._q4(x.data_ptr(), qw.data_ptr(), scale.data_ptr(), offset.data_ptr(),
                 bias.data_ptr() if bias is not None else None, out.data_ptr(), m, n, k, group, torch.get_num_threads())
        return out

    def q4_linear_int8_activations(self, x: torch.Tensor, qw: torch.Tensor, scale: torch.Tensor,
                                   offset: torch.Tensor, group: int, bias: torch.Tensor | None = None) -> torch.Tensor:
        """As q4_linear for one row of x (1, k), with x rounded to int8 per block of 32 columns (llama.cpp's Q8
        activations, onnxruntime's MatMulNBits accuracy_level 4): about twice the speed, error |x - x̂| <= d / 2."""
        m, k = x.shape
        n = qw.shape[0]
        if not (m == 1 and x.dtype == torch.float32 and x.is_contiguous() and qw.shape[1] * 2 == k
                and qw.dtype == torch.uint8 and qw.is_contiguous() and group % 32 == 0 and k % group == 0
                and scale.shape == offset.shape == (n, k // group) and scale.is_contiguous() and offset.is_contiguous()
                and scale.dtype == offset.dtype == torch.float32 and (bias is None or bias.is_contiguous())):
            raise ValueError("q4_linear_int8_activations: bad shapes or dtypes")
        out = torch.empty(1, n, dtype=torch.float32)
        self._q4q8(x.data_ptr(), qw.data_ptr(), scale.data_ptr(), offset.data_ptr(),
                   bias.data_ptr() if bias is not None else None, out.data_ptr(), n, k, group, torch.get_num_threads())
        return out

    def q8_linear(self, x: torch.Tensor, qw: torch.Tensor, scale: torch.Tensor, corr: torch.Tensor | None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (m <= MAX_M, k) fp32; qw (n, k) int8; scale, corr (n,) fp32 -> (m, n)."""
        m, k = x.shape
        n = qw.shape[0]
        if not (m <= MAX_M and x.dtype == torch.float32 and x.is_contiguous() and qw.shape[1] == k
                and qw.dtype == torch.int8 and qw.is_contiguous() and scale.dtype == torch.float32
                and scale.shape == (n,) and (corr is None or corr.shape == (n,)) and (bias is None or bias.is_contiguous())):
            raise ValueError("q8_linear: bad shapes or dtypes")
        out = torch.empty(m, n, dtype=torch.float32)
        self._q8(x.data_ptr(), qw.data_ptr(), scale.data_ptr(), corr.data_ptr() if corr is not None else None,
                 bias.data_ptr() if bias is not None else None, out.data_ptr(), m, n, k, torch.get_num_threads())
        return out

    def dequantize_rows(self, kind: str, out: torch.Tensor, r0: int, r1: int, *, qw: torch.Tensor,
                        scale: torch.Tensor, extra: torch.Tensor | None, block: int) -> None:
        """Rows [r0, r1) of a q4 ("q4": scale, offset=extra, group=block), q8 ("q8": scale, corr=extra) or NF4
        ("nf4": absmax=scale, table=extra, block) weight into out ((r1 - r0, k) fp32, contiguous): the same values
        as quant/linear.py's torch dequantize(), bit for bit."""
        n, k = qw.shape[0], out.shape[1]
        if not (0 <= r0 < r1 <= n and out.shape[0] >= r1 - r0 and out.dtype == torch.float32 and out.is_contiguous()
                and qw.is_contiguous() and scale.is_contiguous() and scale.dtype == torch.float32
                and (extra is None or (extra.is_contiguous() and extra.dtype == torch.float32))):
            raise ValueError(f"dequantize_rows({kind}): bad shapes or dtypes")
        threads = torch.get_num_threads()
        if kind == "q4":
            if not (qw.dtype == torch.uint8 and qw.shape[1] * 2 == k and block % 32 == 0 and k % block == 0
                    and extra is not None and scale.shape == extra.shape == (n, k // block)):
                raise ValueError("dequantize_rows(q4): bad shapes or dtypes")
            self._q4_dequant(qw.data_ptr(), scale.data_ptr(), extra.data_ptr(), out.data_ptr(), r0, r1, k, block,
                             threads)
        elif kind == "q8":
            if not (qw.dtype == torch.int8 and qw.shape[1] == k and scale.shape == (n,)
                    and (extra is None or extra.shape == (n,))):
                raise ValueError("dequantize_rows(q8): bad shapes or dtypes")
            self._q8_dequant(qw.data_ptr(), scale.data_ptr(), extra.data_ptr() if extra is not None else None,
                             out.data_ptr(), r0, r1, k, threads)
        elif kind == "nf4":
            if not (qw.dtype == torch.uint8 and qw.shape[1] * 2 == k and block % 32 == 0 and k % block == 0
                    and scale.shape == (n, k // block) and extra is not None and extra.shape == (16,)):
                raise ValueError("dequantize_rows(nf4): bad shapes or dtypes")
            self._nf4_dequant(qw.data_ptr(), scale.data_ptr(), extra.data_ptr(), out.data_ptr(), r0, r1, k, block,
                              threads)
        else:
            raise ValueError(f"dequantize_rows: unknown kind {kind!r}")

    def tiled_linear(self, x: torch.Tensor, kind: str, n: int, bias: torch.Tensor | None = None, *,
                     tile_bytes: int | None = None, **weights) -> torch.Tensor:
        """x (m, k) fp32 @ W^T for many rows: W is dequantized a tile of rows at a time into a scratch buffer that
        stays in cache, and each tile goes through torch's GEMM into its columns of the output (ldc = n, no copy).
        Memory traffic per weight: the packed code plus a cache-resident fp32 tile, not a full fp32 matrix."""
        m, k = x.shape
        rows = max(8, min(n, (tile_bytes or TILE_BYTES) // (4 * k)))
        scratch = _scratch(rows * k)
        out = torch.empty(m, n, dtype=torch.float32)
        xc = x.contiguous()
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            w = scratch[: (r1 - r0) * k].view(r1 - r0, k)
            self.dequantize_rows(kind, w, r0, r1, **weights)
            if bias is not None:
                torch.addmm(bias[r0:r1], xc, w.t(), out=out[:, r0:r1])
            else:
                torch.mm(xc, w.t(), out=out[:, r0:r1])
        return out

    def nf4_linear(self, x: torch.Tensor, qw: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, block: int,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (m <= MAX_M, k) fp32; qw (n, k / 2) uint8 NF4 codes in the q4 run layout; absmax (n, k / block) fp32;
        table (16,) fp32 -> (m, n)."""
        m, k = x.shape
        n = qw.shape[0]
        if not (m <= MAX_M and x.dtype == torch.float32 and x.is_contiguous() and qw.shape[1] * 2 == k
                and qw.dtype == torch.uint8 and qw.is_contiguous() and block % 32 == 0 and k % block == 0
                and absmax.shape == (n, k // block) and absmax.dtype == torch.float32 and absmax.is_contiguous()
                and table.shape == (16,) and table.dtype == torch.float32 and table.is_contiguous()
                and (bias is None or bias.is_contiguous())):
            raise ValueError("nf4_linear: bad shapes or dtypes")
        out = torch.empty(m, n, dtype=torch.float32)
        self._nf4(x.data_ptr(), qw.data_ptr(), absmax.data_ptr(), table.data_ptr(),
                  bias.data_ptr() if bias is not None else None, out.data_ptr(), m, n, k, block, torch.get_num_threads())
        return out


_scratch_local = threading.local()


def _scratch(numel: int) -> torch.Tensor:
    """A per-thread fp32 buffer of at least numel elements, reused across calls (no page faults per step)."""
    buf = getattr(_scratch_local, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _scratch_local.buf = torch.empty(numel, dtype=torch.float32)
    return buf


def load() -> LowbitKernels | None:
    with _lock:
        if "kernels" not in _state:
            _state["kernels"], _state["reason"] = _load()
    return _state["kernels"]  # type: ignore[return-value]


def status() -> str:
    load()
    return str(_state["reason"])


def _load() -> tuple[LowbitKernels | None, str]:
    if os.environ.get("LMFORGE_CPU_KERNELS", "1") == "0":
        return None, "disabled by LMFORGE_CPU_KERNELS=0"
    compiler = find_c_compiler()
    if compiler is None:
        return None, "no C compiler (cc/gcc) on PATH"
    try:
        path = build_shared_library(SOURCE, "lmforge_lowbit.so", compiler, tuple(CFLAGS))
        return LowbitKernels(ctypes.CDLL(str(path))), f"built {path}"
    except (OSError, subprocess.SubprocessError, AttributeError) as err:
        return None, f"build failed: {str(err)[:200]}"
