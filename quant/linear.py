"""Runtime quantized linears for the native engine: `layer(x, bias) == F.linear(x, W_dequantized, bias)`.

Kernels on CPU (torch 2.13):
- `Int4Linear`: `aten._weight_int4pack_mm_for_cpu` — 4-bit codes, per-group (scale, zero) with
  W = (q - 8) · scale + zero_fp. Any uniform grid of ≤ 4 bits fits: GPTQ's W = (q - z) · s is the same
  with zero_fp = (8 - z) · s, and 2/3-bit codes are 4-bit codes that use part of the range. Needs
  out_features % 16 == 0 and a group of 32/64/128/256 (per-channel uses the largest that divides K, with
  the row's scale repeated). Act-order groups (g_idx not contiguous) become contiguous by permuting
  the input columns once at load and x's columns at run time.
- `Int8Linear`: `torch._weight_int8pack_mm` — int8 weights, one fp scale per output channel
  (symmetric). An asymmetric per-channel grid adds one rank-1 correction:
  x · ((q - z) s)ᵀ = s ⊙ (x · (q - 128)ᵀ) - rowsum(x) · ((z - 128) s).
- `LowbitLinear` / `NF4Linear`: our AVX2 kernels (quant/kernels/lowbit.c) for the few rows of decode: 4-bit
  groups, 8-bit per channel, and NF4 blocks (table lookup in registers). One exception to the equation above:
  a 4-bit GEMV of one row rounds x to int8 per 32 columns by default (`q4_int8_activations`; bounded error,
  LMFORGE_Q4_ACTIVATIONS=fp32 for exact math).
- `DequantLinear`: everything else (8-bit groups, shapes the kernels refuse, no C compiler): the compact form is
  kept and dequantized at every call ("dequantize-on-the-fly"), the fallback the engine reports.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from lifecycle.errors import ConfigError
from quant import primitives as P

INT4_GROUPS = (256, 128, 64, 32)


class QuantLinear:
    """A quantized weight (out_features, in_features) with nn.Linear's math; `path` names the kernel."""

    path: str = "?"
    out_features: int
    in_features: int

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = self.matmul(x)
        return y if bias is None else y + bias

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # (T, K) -> (T, N)
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:  # (N, K) fp32
        raise NotImplementedError


class Int4Linear(QuantLinear):
    path = "int4 packed matmul (aten._weight_int4pack_mm_for_cpu)"

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                 dtype: torch.dtype) -> None:
        """q (N, K) ints < 16, scales/zeros (N, G) of the grid W = (q - zeros) · scales, g_idx (K,)."""
        N, K = q.shape
        self.out_features, self.in_features, self.dtype = N, K, dtype
        self.perm = None
        if not bool((g_idx[1:] >= g_idx[:-1]).all()):  # act-order: sort columns by group
            self.perm = torch.argsort(g_idx, stable=True)
            q, g_idx = q[:, self.perm], g_idx[self.perm]
        counts = torch.bincount(g_idx)
        group = int(counts[0])
        if not bool((counts == group).all()):
            raise ValueError("groups of unequal size")
        step = group if group in INT4_GROUPS else next((s for s in INT4_GROUPS if group % s == 0), None)
        if step is None:
            raise ValueError(f"group size {group} is not a multiple of 32")
        rep = group // step  # kernel groups per quantization group
        scale = scales.repeat_interleave(rep, dim=1).float()  # (N, K / step)
        zero_fp = (8 - zeros.repeat_interleave(rep, dim=1).float()) * scale
        self.group = step
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        self.scales_and_zeros = torch.stack([scale.t(), zero_fp.t()], dim=-1).contiguous().to(dtype)  # (K/step, N, 2)

    @staticmethod
    def supports(bits: int, q: torch.Tensor, g_idx: torch.Tensor) -> bool:
        N, K = q.shape
        groups = torch.bincount(g_idx)
        group = int(groups[0]) if len(groups) else 0
        return (bits <= 4 and N % 16 == 0 and bool((groups == group).all()) and group % 32 == 0
                and K % 2 == 0 and q.device.type == "cpu")

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x[:, self.perm]
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.packed, self.group, self.scales_and_zeros)


class Int8Linear(QuantLinear):
    path = "int8 packed matmul (aten._weight_int8pack_mm)"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dtype: torch.dtype) -> None:
        """q (N, K) ints in [0, 255] with W = (q - zero) · scale per row; zero None means q is already signed."""
        self.out_features, self.in_features = q.shape
        if zero is None:
            self.weight = q.to(torch.int8).contiguous()
            self.correction = None
        else:
            self.weight = (q.to(torch.int32) - 128).to(torch.int8).contiguous()
            corr = (zero.float() - 128) * scale.float()  # (N,)
            self.correction = corr.to(dtype) if bool((corr != 0).any()) else None
        self.scale = scale.float().contiguous().to(dtype)  # (N,)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.contiguous(), self.weight, self.scale)
        if self.correction is not None:
            y = y - x.sum(dim=-1, keepdim=True) * self.correction
        return y


def q4_int8_activations(setting: str | None = None) -> bool:
    """Whether 4-bit GEMVs of one row (single-stream decode) round the activations to int8 per 32 columns, as
    onnxruntime-genai's int4 default (MatMulNBits accuracy_level 4) and llama.cpp do: ~1.5x the GEMV speed for a
    per-token error that is bounded (|x - x_hat| <= d / 2 per block), tested against the exact path and reported
    by `lmforge quantize` (engine logprob error column). The default. LMFORGE_Q4_ACTIVATIONS=fp32 keeps exact fp32
    math on the dequantized weights for every row (greedy output equal to transformers' on the same checkpoint up to
    summation order). Steps of 2+ rows always use fp32 activations."""
    if setting is not None:  # EngineConfig.q4_activations / --q4-activations wins over the environment
        value, label = setting, f"--q4-activations: {setting!r}"
    else:
        value = os.environ.get("LMFORGE_Q4_ACTIVATIONS", "int8")
        label = f"LMFORGE_Q4_ACTIVATIONS={value!r}"
    if value not in ("fp32", "int8"):
        raise ConfigError(f"{label}: use int8 (default: one-row 4-bit GEMVs on int8-rounded activations) or fp32 "
                          "(exact)")
    return value == "int8"


class LowbitLinear(QuantLinear):
    """Our C kernels (quant/kernels/lowbit.c) for decode (<= 8 rows); more rows dequantize a cache-sized tile of
    weight rows at a time in C and run torch's GEMM on it (`LowbitKernels.tiled_linear`).

    4-bit: any uniform grid of <= 4 bits with groups of a multiple of 32 (act-order: columns sorted by group, x
    permuted at run time). 8-bit: per-channel grids (one scale, optional zero correction)."""

    def __init__(self, kernels, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                 bits: int, q4_activations: str | None = None) -> None:
        N, K = q.shape
        self.kernels, self.out_features, self.in_features, self.bits = kernels, N, K, bits
        self.perm = None
        if not bool((g_idx[1:] >= g_idx[:-1]).all()):
            self.perm = torch.argsort(g_idx, stable=True)
            q, g_idx = q[:, self.perm], g_idx[self.perm]
        self.scale = scales.float().contiguous()  # (N, G)
        if bits <= 4:
            self.group = K // scales.shape[1]
            self.offset = (-zeros.float() * self.scale).contiguous()  # W = q * scale + offset
            runs = q.to(torch.uint8).view(N, K // 32, 2, 16)  # (N, runs, low/high half, 16)
            self.qw = (runs[:, :, 0] | (runs[:, :, 1] << 4)).reshape(N, K // 2).contiguous()  # (N, K / 2)
            self.path = "int4 weight-only GEMV (lmforge lowbit kernel; tiled dequantize + torch GEMM above 8 rows)"
            self.int8_activations = q4_int8_activations(q4_activations)
            if self.int8_activations:
                self.path = ("int4 x int8-activation GEMV for one row (lmforge lowbit kernel; LMFORGE_Q4_ACTIVATIONS=fp32 "
                             "for exact; fp32 GEMV up to 8 rows, tiled dequantize + torch GEMM above)")
        else:
            self.qw = (q.to(torch.int32) - 128).to(torch.int8).contiguous()  # (N, K)
            self.scale = self.scale[:, 0].contiguous()
            corr = (zeros[:, 0].float() - 128) * self.scale
            self.corr = corr.contiguous() if bool((corr != 0).any()) else None
            self.path = "int8 weight-only GEMV (lmforge lowbit kernel; tiled dequantize + torch GEMM above 8 rows)"

    @staticmethod
    def supports(bits: int, q: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor) -> bool:
        N, K = q.shape
        if q.device.type != "cpu" or K % 32:
            return False
        if bits == 8:
            return scales.shape[1] == 1
        counts = torch.bincount(g_idx)
        return bits <= 4 and bool((counts == counts[0]).all()) and int(counts[0]) % 32 == 0

    def dequantize(self) -> torch.Tensor:
        if self.bits <= 4:
            lo, hi = (self.qw & 0xF).view(self.out_features, -1, 16), (self.qw >> 4).view(self.out_features, -1, 16)
            q = torch.stack([lo, hi], dim=2).reshape(self.out_features, self.in_features).float()  # (N, K)
            g = torch.arange(self.in_features) // self.group
            w = q * self.scale[:, g] + self.offset[:, g]
        else:
            w = self.qw.float() * self.scale[:, None]
            if self.corr is not None:
                w = w - self.corr[:, None]
        if self.perm is not None:  # back to the original column order
            w = w[:, torch.argsort(self.perm)]
        return w

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        from quant.kernels import MAX_M

        if x.dtype != torch.float32:
            return F.linear(x, self.dequantize().to(x.dtype), bias)
        if x.dim() != 2:
            return self(x.reshape(-1, x.shape[-1]), bias).view(*x.shape[:-1], self.out_features)
        if self.perm is not None:
            x = x[:, self.perm]
        x = x.contiguous()
        if x.shape[0] > MAX_M:
            if self.bits <= 4:
                return self.kernels.tiled_linear(x, "q4", self.out_features, bias, qw=self.qw, scale=self.scale,
                                                 extra=self.offset, block=self.group)
            return self.kernels.tiled_linear(x, "q8", self.out_features, bias, qw=self.qw, scale=self.scale,
                                             extra=self.corr, block=0)
        if self.bits <= 4:
            if self.int8_activations and x.shape[0] == 1:
                return self.kernels.q4_linear_int8_activations(x, self.qw, self.scale, self.offset, self.group, bias)
            return self.kernels.q4_linear(x, self.qw, self.scale, self.offset, self.group, bias)
        return self.kernels.q8_linear(x, self.qw, self.scale, self.corr, bias)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)

    def few_rows_descriptor(self) -> list[int] | None:
        """This linear as a projection of the serving kernels' one-call forward (serve/worker/kernels/cpu_kernels.c,
        lmf_projection): [kind, fn, fn_one_row, codes, scales, offsets or correction, group] with the addresses of
        this library's kernels, which then run exactly as `__call__` would. None for act-order (x is permuted)."""
        if self.perm is not None:
            return None
        k = self.kernels
        if self.bits <= 4:
            one_row = _address(k._q4q8) if self.int8_activations else 0
            return [2, _address(k._q4), one_row, self.qw.data_ptr(), self.scale.data_ptr(), self.offset.data_ptr(),
                    self.group]
        return [4, _address(k._q8), 0, self.qw.data_ptr(), self.scale.data_ptr(),
                self.corr.data_ptr() if self.corr is not None else 0, 0]


def _address(fn) -> int:
    """The address of a ctypes function (to pass to C code that calls it)."""
    import ctypes

    return ctypes.cast(fn, ctypes.c_void_p).value


class NF4Linear(QuantLinear):
    """NF4 (bitsandbytes) weights on our C kernel for decode (<= 8 rows); more rows dequantize tiles in C for torch's
    GEMM. The codes are repacked at load into the q4 kernel's run layout; blocks must lie within rows."""

    def __init__(self, kernels, parts: list[tuple[torch.Tensor, torch.Tensor, tuple[int, int], int]]) -> None:
        """parts: (packed (n*k/2, 1) uint8, absmax (n*k/block,) fp32, shape (n, k), block) of linears with the same
        k and block, stacked along the output dimension."""
        self.kernels = kernels
        self.block = parts[0][3]
        self.in_features = K = parts[0][2][1]
        codes = torch.cat([_nf4_codes(p[0], p[2]) for p in parts])  # (N, K)
        N = self.out_features = codes.shape[0]
        runs = codes.view(N, K // 32, 2, 16)
        self.qw = (runs[:, :, 0] | (runs[:, :, 1] << 4)).reshape(N, K // 2).contiguous()  # (N, K / 2)
        self.absmax = torch.cat([p[1].float().view(p[2][0], K // self.block) for p in parts]).contiguous()  # (N, K/bs)
        self.table = P.NF4_TABLE.float().contiguous()
        self.path = "nf4 weight-only GEMV (lmforge lowbit kernel; tiled dequantize + torch GEMM above 8 rows)"

    @staticmethod
    def supports(parts) -> bool:
        k, block = parts[0][2][1], parts[0][3]
        return all(p[2][1] == k and p[3] == block for p in parts) and k % 32 == 0 and k % block == 0 \
            and block % 32 == 0

    def dequantize(self) -> torch.Tensor:
        lo, hi = (self.qw & 0xF).view(self.out_features, -1, 16), (self.qw >> 4).view(self.out_features, -1, 16)
        codes = torch.stack([lo, hi], dim=2).reshape(self.out_features, self.in_features).long()  # (N, K)
        return (self.table[codes].view(self.out_features, -1, self.block) * self.absmax[:, :, None]).view(
            self.out_features, self.in_features)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        from quant.kernels import MAX_M

        if x.dtype != torch.float32:
            return F.linear(x, self.dequantize().to(x.dtype), bias)
        if x.dim() != 2:
            return self(x.reshape(-1, x.shape[-1]), bias).view(*x.shape[:-1], self.out_features)
        if x.shape[0] > MAX_M:
            return self.kernels.tiled_linear(x, "nf4", self.out_features, bias, qw=self.qw, scale=self.absmax,
                                             extra=self.table, block=self.block)
        return self.kernels.nf4_linear(x.contiguous(), self.qw, self.absmax, self.table, self.block, bias)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)


def _nf4_codes(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """bitsandbytes' packing (first code of a pair in the high nibble) -> (n, k) uint8 codes."""
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(shape)


class DequantLinear(QuantLinear):
    """Compact storage, dequantized at each call. `make` rebuilds the (N, K) weight."""

    def __init__(self, make, shape: tuple[int, int], dtype: torch.dtype, what: str) -> None:
        self.make, self.dtype = make, dtype
        self.out_features, self.in_features = shape
        self.path = f"dequantize-on-the-fly ({what}: no low-bit kernel for it)"

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.make().to(x.dtype))


class ConcatLinear(QuantLinear):
    """Several quantized linears on the same input whose grids cannot be fused (e.g. act-order q/k/v)."""

    def __init__(self, parts: list[QuantLinear]) -> None:
        self.parts = parts
        self.out_features = sum(p.out_features for p in parts)
        self.in_features = parts[0].in_features
        self.path = parts[0].path

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.matmul(x) for p in self.parts], dim=-1)


def grid_linear(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int,
                dtype: torch.dtype, q4_activations: str | None = None) -> QuantLinear:
    """The fastest module for a uniform grid: q (N, K), scales/zeros (N, G), g_idx (K,).

    Our C kernels first (torch 2.13's int4/int8 packed matmuls are 10-20x slower than fp32 on AVX2 CPUs), then
    torch's packed matmuls, then dequantize-on-the-fly."""
    from quant import kernels

    lowbit = kernels.load() if dtype == torch.float32 else None
    if lowbit is not None and LowbitLinear.supports(bits, q, scales, g_idx):
        return LowbitLinear(lowbit, q, scales, zeros, g_idx, bits, q4_activations)
    if Int4Linear.supports(bits, q, g_idx):
        return Int4Linear(q, scales, zeros, g_idx, dtype)
    if bits == 8 and scales.shape[1] == 1 and q.device.type == "cpu":
        return Int8Linear(q, scales[:, 0], zeros[:, 0], dtype)
    s, z, g = scales.float(), zeros.float(), g_idx.long()
    codes = q.to(torch.uint8)
    why = f"{bits}-bit, {scales.shape[1]} group(s), {q.shape[0]} outputs"
    return DequantLinear(lambda: P.dequantize_groups(codes, s, z, g), tuple(q.shape), dtype, why)


def nf4_linear(parts: list[tuple[torch.Tensor, torch.Tensor, tuple[int, int], int]], dtype: torch.dtype) -> QuantLinear:
    """NF4 linears reading the same input, stacked: our kernel where it fits, else dequantize-on-the-fly."""
    from quant import kernels

    lowbit = kernels.load() if dtype == torch.float32 else None
    if lowbit is not None and NF4Linear.supports(parts):
        return NF4Linear(lowbit, parts)
    shape = (sum(p[2][0] for p in parts), parts[0][2][1])
    why = "nf4" if lowbit is None else f"nf4 blocks of {parts[0][3]} span rows of {shape[1]}"
    return DequantLinear(lambda: torch.cat([P.dequantize_nf4(*p) for p in parts]), shape, dtype, why)


def fuse_grids(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]], bits: int,
               dtype: torch.dtype, q4_activations: str | None = None) -> QuantLinear:
    """Stack linears that read the same input (q/k/v, gate/up) along the output dimension into one."""
    if all(torch.equal(p[3], parts[0][3]) for p in parts):
        q, s, z = (torch.cat([p[i] for p in parts]) for i in range(3))
        return grid_linear(q, s, z, parts[0][3], bits, dtype, q4_activations)
    return ConcatLinear([grid_linear(*p, bits=bits, dtype=dtype, q4_activations=q4_activations) for p in parts])


class QuantizedWeights:
    """The quantized linears of a checkpoint's state dict, for the engine: `linear([names])` gives one module
    for linears that read the same input (fused along the output dimension), `paths` what runs them."""

    def __init__(self, state: dict[str, torch.Tensor], qconfig: dict, *, source: str, dtype: torch.dtype,
                 q4_activations: str | None = None) -> None:
        from quant.formats import method_of

        self.state, self.source, self.dtype = state, source, dtype
        self.q4_activations = q4_activations  # None: LMFORGE_Q4_ACTIVATIONS, else int8
        self.format, self.bits = method_of(qconfig, source)
        self.paths: dict[str, int] = {}

    def holds(self, name: str) -> bool:
        """Whether the checkpoint stores linear `name` quantized (by its format's marker tensor)."""
        from quant.formats import NF4_STATE_KEY

        marker = {"gptq": "qweight", "int8": "SCB", "nf4": f"weight.{NF4_STATE_KEY}"}[self.format]
        return f"{name}.{marker}" in self.state

    def is_quantized(self, name: str) -> bool:
        return f"{name}.weight" not in self.state or self.state[f"{name}.weight"].dtype in (torch.int8, torch.uint8)

    def linear(self, names: list[str]) -> QuantLinear:
        from quant import formats

        if self.format == "gptq":
            mod = fuse_grids([formats.read_grid(self.state, n, self.bits, self.source) for n in names], self.bits,
                             self.dtype, self.q4_activations)
        elif self.format == "int8":
            q = torch.cat([formats._need(self.state, f"{n}.weight", self.source) for n in names])
            scb = torch.cat([formats._need(self.state, f"{n}.SCB", self.source) for n in names]).float()
            mod = grid_linear((q.to(torch.int32) + 128), (scb / 127)[:, None], torch.full((q.shape[0], 1), 128.0),
                              torch.zeros(q.shape[1], dtype=torch.long), 8, self.dtype)
        else:
            parts = [formats.read_nf4_codes(self.state, n, self.source) for n in names]  # (packed, absmax, shape, bs)
            mod = nf4_linear(parts, self.dtype)
        self.paths[mod.path] = self.paths.get(mod.path, 0) + 1
        return mod

    def describe(self) -> str:
        return "; ".join(f"{path} x{count}" for path, count in self.paths.items())
