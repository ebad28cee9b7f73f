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
MAX_M = 8  # rows per call (decode); more rows go to torch (dequantize + GEMM wins there)

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
