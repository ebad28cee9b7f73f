"""Pure tensor functions of quantization: grids, (de)quantize, bit packing, NF4.

Conventions: a weight is (out_features, in_features) = (N, K) as in nn.Linear. A "group" is
`group_size` consecutive input columns sharing one scale and zero per output row; per-channel is
one group spanning all of K (`group_size=None`). Integers q live in [0, 2^bits - 1] and dequantize
as (q - zero) * scale, the uniform affine grid of GPTQ (Frantar et al. 2022, §2) and of its on-disk
format. NF4 (Dettmers et al. 2023, QLoRA §3) is a 16-entry non-uniform table scaled by each block's
absmax, laid out as bitsandbytes stores it.
"""

from __future__ import annotations

import math

import torch

from lifecycle.errors import ConfigError

SUPPORTED_BITS = (2, 3, 4, 8)
WORD_BITS = 32  # GPTQ packs into int32 words


def check_bits(bits: int, field: str = "bits") -> None:
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"{field}: {bits} is not supported; use one of {', '.join(map(str, SUPPORTED_BITS))}")


def check_group_size(group_size: int | None, in_features: int, where: str = "weight") -> None:
    if group_size is None:
        return
    if group_size <= 0 or in_features % group_size:
        raise ConfigError(f"group size {group_size} does not divide the input dimension {in_features} of {where}; "
                          "pick a divisor (e.g. 32, 64, 128) or per-channel")


# ------------------------------------------------------------------------------------ uniform grids


def grid_params(w: torch.Tensor, bits: int, *, sym: bool, min_zero: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero of the min/max grid per row of `w` (rows, cols) -> (rows,), (rows,).

    As GPTQ's reference `Quantizer.find_params`: the range always contains 0 (so 0 is exact up to
    rounding of the zero), symmetric grids centre the zero at (maxq + 1) / 2, an all-zero row gets
    the range [-1, 1]. `min_zero=1` keeps the zero >= 1, which the GPTQ v1 file format needs
    (it stores zero - 1 unsigned; see `pack_gptq`).
    """
    maxq = 2**bits - 1
    wf = w.float()
    xmin = wf.min(dim=1).values.clamp(max=0)
    xmax = wf.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale)
        if min_zero > 0:
            # Shift the grid up by the missing steps: the top of the range loses them, never the bottom.
            need = (zero < min_zero)
            scale = torch.where(need, xmax / (maxq - min_zero), scale)
            zero = torch.where(need, torch.full_like(zero, float(min_zero)), zero)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """q = clamp(round(w / scale) + zero, 0, maxq); scale/zero broadcast against w. Returns int32."""
    maxq = 2**bits - 1
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q.float() - zero) * scale


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int | None, *, sym: bool,
                 min_zero: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest per group: (N, K) -> q (N, K) int32, scales (N, G), zeros (N, G) (G = K / group_size)."""
    check_bits(bits)
    n, k = w.shape
    check_group_size(group_size, k)
    g = group_size or k
    wg = w.float().reshape(n, k // g, g)  # (N, G, g)
    scale, zero = grid_params(wg.reshape(-1, g), bits, sym=sym, min_zero=min_zero)
    scale, zero = scale.view(n, k // g), zero.view(n, k // g)  # (N, G)
    q = quantize(wg, scale[..., None], zero[..., None], bits).reshape(n, k)
    return q, scale, zero


def dequantize_groups(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """(N, K) ints with per-(row, group) scales/zeros (N, G) and column -> group map g_idx (K,) -> (N, K) fp32."""
    s = scales[:, g_idx.long()]  # (N, K)
    z = zeros[:, g_idx.long()].float()
    return (q.float() - z) * s


# ------------------------------------------------------------------------------------ int32 packing


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along dim 0: (R, C) ints in [0, 2^bits) -> (R * bits / 32, C) int32.

    Every 32 consecutive rows form one little-endian bit stream of 32 * bits bits split into `bits`
    words: value j of the run sits at bit j * bits. For 2/4/8 bits that is the familiar
    `word |= q[j] << (bits * j)`; for 3 bits it is GPTQ's 10 | 1 | 10 | 1 | 10 layout with values
    straddling words (AutoGPTQ `QuantLinear.pack`, GPTQModel `_pack_rows_3`).
    """
    check_bits(bits)
    r, c = values.shape
    if r % WORD_BITS:
        raise ConfigError(f"cannot pack {r} rows: the dimension must be a multiple of {WORD_BITS}")
    v = values.to(torch.int64).reshape(r // WORD_BITS, WORD_BITS, c)  # (runs, 32, C)
    out = torch.zeros(r // WORD_BITS, bits, c, dtype=torch.int64)  # (runs, bits words, C)
    mask = (1 << bits) - 1
    for j in range(WORD_BITS):
        offset = j * bits
        word, shift = divmod(offset, WORD_BITS)
        out[:, word] |= (v[:, j] & mask) << shift
        spill = shift + bits - WORD_BITS
        if spill > 0:  # the high bits continue at the bottom of the next word
            out[:, word + 1] |= (v[:, j] & mask) >> (bits - spill)
    out &= 0xFFFFFFFF
    return _u32_to_i32(out.reshape(-1, c))


def unpack_int32(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_int32`: (R * bits / 32, C) int32 -> (R, C) int32 in [0, 2^bits)."""
    check_bits(bits)
    w, c = packed.shape
    p = (packed.to(torch.int64) & 0xFFFFFFFF).reshape(w // bits, bits, c)  # (runs, bits words, C)
    out = torch.zeros(w // bits, WORD_BITS, c, dtype=torch.int64)
    mask = (1 << bits) - 1
    for j in range(WORD_BITS):
        word, shift = divmod(j * bits, WORD_BITS)
        val = p[:, word] >> shift
        spill = shift + bits - WORD_BITS
        if spill > 0:
            val = val | (p[:, word + 1] << (bits - spill))
        out[:, j] = val & mask
    return out.reshape(-1, c).to(torch.int32)


def _u32_to_i32(x: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit values -> int32 with the same bits."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def pack_gptq(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
              bits: int) -> dict[str, torch.Tensor]:
    """The GPTQ v1 on-disk tensors of one linear layer.

    q (N, K), scales/zeros (N, G), g_idx (K,) ->
      qweight (K * bits / 32, N) int32: packed along the input dimension,
      qzeros  (G, N * bits / 32) int32: zero - 1 packed along the output dimension ("v1": AutoGPTQ
              subtracted 1 before saving; every loader adds it back, so zeros must be >= 1),
      scales  (G, N) fp16, g_idx (K,) int32.
    """
    if int(zeros.min()) < 1:
        raise ValueError("GPTQ v1 format stores zero - 1: zeros must be >= 1 (quantize with min_zero=1)")
    return {
        "qweight": pack_int32(q.t().contiguous(), bits),  # (K, N) -> (K * bits / 32, N)
        "qzeros": pack_int32((zeros.to(torch.int32) - 1).contiguous(), bits).t().contiguous(),  # (N, G) -> (G, N*b/32)
        "scales": scales.t().contiguous().to(torch.float16),  # (G, N)
        "g_idx": g_idx.to(torch.int32),
    }


def unpack_gptq(tensors: dict[str, torch.Tensor], bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `pack_gptq`: -> q (N, K), scales (N, G) fp32, zeros (N, G) int32, g_idx (K,) int64."""
    q = unpack_int32(tensors["qweight"], bits).t().contiguous()  # (N, K)
    zeros = unpack_int32(tensors["qzeros"].t().contiguous(), bits) + 1  # (N, G)
    scales = tensors["scales"].float().t().contiguous()  # (N, G)
    return q, scales, zeros, tensors["g_idx"].long()


# ------------------------------------------------------------------------------------ NF4 (bitsandbytes)

# The 16 NF4 levels: quantiles of N(0, 1) normalised to [-1, 1] with an exact zero (QLoRA appendix E),
# as the constants bitsandbytes ships (`get_4bit_type("nf4")`).
NF4_TABLE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230731010437, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])


def quantize_nf4(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise NF4 of the flattened weight: -> packed (numel / 2, 1) uint8, absmax (numel / blocksize,) fp32.

    Each block of `blocksize` values is divided by its absmax and mapped to the nearest table entry;
    two codes per byte, the first in the high nibble (bitsandbytes' layout).
    """
    flat = w.reshape(-1).float()
    if flat.numel() % blocksize:
        raise ConfigError(f"NF4 blocksize {blocksize} does not divide the {flat.numel()} weights")
    blocks = flat.view(-1, blocksize)  # (num_blocks, blocksize)
    absmax = blocks.abs().max(dim=1).values  # (num_blocks,)
    normed = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    codes = nearest_code(normed.reshape(-1), NF4_TABLE).to(torch.uint8)  # (numel,)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.view(-1, 1), absmax


def nearest_code(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of a sorted `table` for each x (ties to the lower entry)."""
    mids = (table[1:] + table[:-1]) / 2  # decision boundaries
    return torch.bucketize(x, mids, right=False)


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...], blocksize: int = 64) -> torch.Tensor:
    p = packed.reshape(-1)
    codes = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1).long()  # (numel,)
    vals = NF4_TABLE[codes].view(-1, blocksize) * absmax[:, None]
    return vals.reshape(shape)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The 256-entry "dynamic" 8-bit float code of Dettmers et al. 2022 (8-bit optimizers, §2.2),
    which bitsandbytes uses to store NF4's absmax under double quantization (`create_dynamic_map`)."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        n = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        bounds = torch.linspace(0.1, 1, n, dtype=torch.float32)
        means = ((bounds[:-1] + bounds[1:]) / 2.0).tolist()
        data += [(10 ** (-(max_exponent_bits - 1) + i)) * m for m in means]
        if signed:
            data += [-(10 ** (-(max_exponent_bits - 1) + i)) * m for m in means]
    if additional_items > 0:
        bounds = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = ((bounds[:-1] + bounds[1:]) / 2.0).tolist()
        data += [(10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * m for m in means]
        if signed:
            data += [-(10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * m for m in means]
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def double_quantize_absmax(absmax: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QLoRA §3 double quantization: absmax - mean, blockwise 8-bit with the dynamic code.

    -> codes (n,) uint8, nested absmax (ceil(n / blocksize),) fp32, offset () fp32.
    """
    offset = absmax.mean()
    centred = absmax - offset
    n = centred.numel()
    num_blocks = math.ceil(n / blocksize)
    padded = torch.cat([centred, centred.new_zeros(num_blocks * blocksize - n)]).view(num_blocks, blocksize)
    nested = padded.abs().max(dim=1).values  # (num_blocks,)
    code = dynamic_map()
    codes = nearest_code((padded / nested.clamp(min=torch.finfo(torch.float32).tiny)[:, None]).reshape(-1), code)
    return codes[:n].to(torch.uint8), nested, offset


def dequantize_absmax(codes: torch.Tensor, nested: torch.Tensor, offset: torch.Tensor, blocksize: int = 256) -> torch.Tensor:
    n = codes.numel()
    vals = dynamic_map()[codes.long()]
    scale = nested.repeat_interleave(blocksize)[:n]
    return vals * scale + offset
