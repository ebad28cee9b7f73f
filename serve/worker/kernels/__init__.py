"""lmforge's CPU kernels (`cpu_kernels.c`): built on first use with the system C compiler, loaded with ctypes.

Why C and ctypes rather than a torch C++ extension: the source needs no torch headers, so it compiles in about a
second with `cc -O3 -march=native -fopenmp`, and needs neither ninja nor a matching libtorch ABI. OpenMP resolves
to the libgomp torch has already loaded (same soname), so kernels and torch share one thread pool.

The build and its cache (`$LMFORGE_KERNEL_CACHE`, keyed by source, flags, compiler and CPU flags) are
lifecycle/native_build.py's, shared with quant/kernels.

Kernels are an optimisation, never a requirement: with no compiler, a failed build, a non-CPU device, a dtype
other than fp32, or `LMFORGE_CPU_KERNELS=0`, `load()` returns None (`status()` says why) and callers use torch.
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from lifecycle.native_build import build_shared_library, find_c_compiler

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
# A linear layer goes to `linear_small_m` up to this many rows; above it torch's GEMM (MKL/oneDNN) wins.
MAX_SMALL_M = 8

_i64, _ptr, _f32, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int


@dataclass(frozen=True)
class KernelStatus:
    available: bool
    reason: str  # what was built and where, or why not
    path: str | None = None


class CpuKernels:
    """Typed wrappers over the shared library; every argument is checked before a pointer is passed."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        def bind(name: str, *argtypes: type) -> ctypes._CFuncPtr:
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = None, list(argtypes)
            return fn

        self._attn = bind("lmf_paged_attention_f32", _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64,
                          _i64, _i64, _i64, _i64, _f32, _ptr, _int)
        self._linear = bind("lmf_linear_small_m_f32", _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _int, _int)
        self._linear_bf16w = bind("lmf_linear_small_m_bf16w", _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _int, _int)
        self._rms_norm = bind("lmf_rms_norm_f32", _ptr, _ptr, _ptr, _i64, _i64, _f32, _int)
        self._rope = bind("lmf_rope_inplace_f32", _ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _int)
        self._silu_mul = bind("lmf_silu_mul_f32", _ptr, _ptr, _i64, _i64, _int)
        self._write_kv = bind("lmf_write_kv_f32", _ptr, _i64, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr)
        self._forward_few_rows = bind("lmf_forward_few_rows_f32", _ptr, _i64, _i64, _i64, _ptr, _ptr, _i64, _i64,
                                      _i64, _i64, _f32, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64,
                                      _i64, _f32, _ptr, _ptr, _ptr, _int, _int, _ptr)

    def paged_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, query_starts: torch.Tensor, query_lens: torch.Tensor,
                        seq_lens: torch.Tensor, block_size: int, scale: float,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        """q: (num_tokens, heads, head_dim), rows may be strided (a view into the fused QKV output); caches:
        (num_slots, kv_heads, head_dim); block_tables: (num_seqs, max_blocks) int64; query_starts/query_lens/
        seq_lens: (num_seqs,) int64. Returns `out` (num_tokens, heads, head_dim), of which only the given
        sequences' rows are written."""
        _check_f32(k_cache, v_cache)
        _check_rows(q)
        _check_i64(block_tables, query_starts, query_lens, seq_lens)
        num_tokens, num_heads, head_dim = q.shape
        num_kv_heads = k_cache.shape[1]
        if k_cache.shape[2] != head_dim or num_heads % num_kv_heads:
            raise ValueError(f"q {tuple(q.shape)} does not fit cache {tuple(k_cache.shape)}")
        if out is None:
            out = q.new_empty(q.shape)
        _check_f32(out)
        if out.shape != q.shape:
            raise ValueError(f"out {tuple(out.shape)} is not shaped like q {tuple(q.shape)}")
        self._attn(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
                   query_starts.data_ptr(), query_lens.data_ptr(), seq_lens.data_ptr(), block_tables.shape[0],
                   block_tables.shape[1], num_tokens, num_heads, num_kv_heads, head_dim, block_size, scale,
                   out.data_ptr(), torch.get_num_threads())
        return out

    def linear_small_m(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       out: torch.Tensor | None = None) -> torch.Tensor:
        """x: (m, k), weight: (n, k), bias: (n,) -> (m, n), as F.linear. With `out`, adds into it (residual).
        A bfloat16 `weight` is read as such (half the bytes to stream), x, bias and the sums stay fp32."""
        bf16 = weight.dtype == torch.bfloat16
        if bf16 and not (weight.device.type == "cpu" and weight.is_contiguous()):
            raise ValueError("bf16 weights for the kernel must be contiguous CPU tensors")
        _check_f32(x, *([] if bf16 else [weight]), *([bias] if bias is not None else []))
        m, k = x.shape
        n = weight.shape[0]
        if weight.shape[1] != k or (bias is not None and bias.shape != (n,)):
            raise ValueError(f"x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
        accumulate = out is not None
        if out is None:
            out = x.new_empty((m, n))
        else:
            _check_f32(out)
            if out.shape != (m, n):
                raise ValueError(f"out {tuple(out.shape)} is not ({m}, {n})")
        (self._linear_bf16w if bf16 else self._linear)(
            x.data_ptr(), weight.data_ptr(), bias.data_ptr() if bias is not None else None, out.data_ptr(), m, n, k,
            int(accumulate), torch.get_num_threads())
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """(rows, dim) -> (rows, dim): weight * x / sqrt(mean(x^2) + eps)."""
        _check_f32(x, weight)
        out = x.new_empty(x.shape)
        self._rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps,
                       torch.get_num_threads())
        return out

    def rope_(self, x: torch.Tensor, num_heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor,
              positions: torch.Tensor) -> None:
        """Rotate the first `num_heads` heads of every row of x (rows, >= num_heads * head_dim) in place, with
        cos/sin tables (max_positions, head_dim) at `positions` (rows,) int64."""
        _check_rows(x)
        _check_f32(cos, sin)
        _check_i64(positions)
        if x.stride(1) != 1 or x.shape[1] < num_heads * head_dim or cos.shape[1] != head_dim:
            raise ValueError(f"rope: x {tuple(x.shape)} has no {num_heads} heads of {head_dim}")
        self._rope(x.data_ptr(), x.shape[0], x.stride(0), num_heads, head_dim, cos.data_ptr(), sin.data_ptr(),
                   positions.data_ptr(), torch.get_num_threads())

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """(rows, 2 * inter) -> (rows, inter): silu(gate) * up."""
        _check_f32(gate_up)
        rows, width = gate_up.shape
        out = gate_up.new_empty((rows, width // 2))
        self._silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, width // 2, torch.get_num_threads())
        return out

    def write_kv(self, qkv: torch.Tensor, k_offset: int, v_offset: int, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slots: torch.Tensor) -> None:
        """Copy each row's K (at column k_offset) and V (at v_offset) of the fused QKV output into the caches
        (num_slots, kv_heads, head_dim) at `slots` (rows,) int64."""
        _check_rows(qkv)
        _check_f32(k_cache, v_cache)
        _check_i64(slots)
        width = k_cache.shape[1] * k_cache.shape[2]
        if qkv.stride(1) != 1 or max(k_offset, v_offset) + width > qkv.shape[1] or len(slots) != qkv.shape[0]:
            raise ValueError(f"write_kv: qkv {tuple(qkv.shape)} does not hold K/V of width {width}")
        self._write_kv(qkv.data_ptr(), qkv.shape[0], qkv.stride(0), k_offset, v_offset, width, k_cache.data_ptr(),
                       v_cache.data_ptr(), slots.data_ptr())


    def forward_few_rows(self, x: torch.Tensor, layer_ptrs: torch.Tensor, kv_ptrs: torch.Tensor, *, num_heads: int,
                         num_kv_heads: int, head_dim: int, intermediate_size: int, eps: float, cos: torch.Tensor,
                         sin: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, block_tables: torch.Tensor,
                         query_starts: torch.Tensor, query_lens: torch.Tensor, seq_lens: torch.Tensor,
                         block_size: int, scale: float, final_norm: torch.Tensor,
                         weights_bf16: bool = False, proj_descs: torch.Tensor | None = None) -> torch.Tensor:
        """Every layer and the final norm in one call, for a step of at most MAX_SMALL_M rows whose sequences all
        attend in the kernel. x: (rows, hidden), the embeddings, updated in place (the residual stream);
        layer_ptrs (num_layers, 7) and kv_ptrs (num_layers, 2) int64 addresses (`LlamaDecoder` builds them from
        tensors it keeps alive); with `weights_bf16` the four projections of every layer are bfloat16 (a draft
        model's compact copy), norms and activations fp32. `proj_descs` (num_layers, 4, 7) int64: the four
        projections of a quantized model as descriptors (cpu_kernels.c, lmf_projection; `quant.linear` builds
        them), replacing layer_ptrs' projection addresses. Returns the final hidden states (rows, hidden)."""
        _check_f32(x, cos, sin, final_norm)
        _check_i64(layer_ptrs, kv_ptrs, positions, slots, block_tables, query_starts, query_lens, seq_lens)
        rows, hidden = x.shape
        num_layers = layer_ptrs.shape[0]
        if proj_descs is not None:
            _check_i64(proj_descs)
        if layer_ptrs.shape != (num_layers, 7) or kv_ptrs.shape != (num_layers, 2) or len(positions) != rows \
                or len(slots) != rows or int(query_lens.sum()) != rows \
                or (proj_descs is not None and proj_descs.shape != (num_layers, 4, 7)):
            raise ValueError(f"forward_few_rows: {rows} rows do not fit the layer/KV tables or the step layout")
        num_q, num_kv = num_heads * head_dim, num_kv_heads * head_dim
        scratch = x.new_empty(rows * (2 * hidden + num_q + 2 * num_kv + num_q + 3 * intermediate_size))
        out = x.new_empty((rows, hidden))
        self._forward_few_rows(x.data_ptr(), rows, hidden, num_layers, layer_ptrs.data_ptr(), kv_ptrs.data_ptr(),
                               num_heads, num_kv_heads, head_dim, intermediate_size, eps, cos.data_ptr(),
                               sin.data_ptr(), positions.data_ptr(), slots.data_ptr(), block_tables.data_ptr(),
                               query_starts.data_ptr(), query_lens.data_ptr(), seq_lens.data_ptr(),
                               block_tables.shape[0], block_tables.shape[1], block_size, scale, final_norm.data_ptr(),
                               scratch.data_ptr(), out.data_ptr(), int(weights_bf16), torch.get_num_threads(),
                               proj_descs.data_ptr() if proj_descs is not None else None)
        return out


def _check_rows(t: torch.Tensor) -> None:
    """fp32 on CPU, each row contiguous (rows themselves may be strided)."""
    inner = t[0] if t.dim() > 1 and t.shape[0] else t
    if t.dtype != torch.float32 or t.device.type != "cpu" or not inner.is_contiguous():
        raise ValueError(f"CPU kernels take fp32 CPU tensors with contiguous rows, got {t.dtype} on {t.device}")


def _check_f32(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"CPU kernels take contiguous fp32 CPU tensors, got {t.dtype} on {t.device} "
                             f"(contiguous={t.is_contiguous()})")


def _check_i64(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype != torch.int64 or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"CPU kernels take contiguous int64 CPU index tensors, got {t.dtype} on {t.device}")


_lock = threading.Lock()
_loaded: tuple[CpuKernels | None, KernelStatus] | None = None


def load() -> CpuKernels | None:
    """The kernels, built if needed; None when they cannot be had (see `status()`)."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load()
            log.info("CPU kernels: %s", _loaded[1].reason)
    return _loaded[0]


def status() -> KernelStatus:
    load()
    assert _loaded is not None
    return _loaded[1]


def _load() -> tuple[CpuKernels | None, KernelStatus]:
    if os.environ.get("LMFORGE_CPU_KERNELS", "1") == "0":
        return None, KernelStatus(False, "disabled by LMFORGE_CPU_KERNELS=0")
    compiler = find_c_compiler()
    if not compiler:
        return None, KernelStatus(False, "no C compiler (cc/gcc) on PATH; using torch ops")
    try:
        path = build_shared_library(SOURCE, "lmforge_cpu_kernels.so", compiler, tuple(CFLAGS))
        return CpuKernels(ctypes.CDLL(str(path))), KernelStatus(True, f"built with {compiler} at {path}", str(path))
    except (OSError, subprocess.SubprocessError, AttributeError) as exc:
        return None, KernelStatus(False, f"build failed ({exc}); using torch ops")
