"""Quantize/dequantize, packing and NF4 against float64 brute force and against the reference libraries."""

from __future__ import annotations

import itertools

import pytest
import torch

from lifecycle.errors import ConfigError
from quant import primitives as P


def brute_force_rtn(w: torch.Tensor, bits: int, group: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """float64, one group at a time, straight from the definition (GPTQ's Quantizer)."""
    maxq = 2**bits - 1
    out = torch.empty_like(w, dtype=torch.float64)
    is_tie = torch.zeros_like(w, dtype=torch.bool)
    for r in range(w.shape[0]):
        for g0 in range(0, w.shape[1], group):
            x = w[r, g0:g0 + group].double()
            lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
            if sym:
                hi = max(abs(lo), hi)
                lo = -hi if lo < 0 else lo
            if lo == 0 and hi == 0:
                lo, hi = -1.0, 1.0
            scale = (hi - lo) / maxq
            zero = (maxq + 1) // 2 if sym else round(-lo / scale)
            q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
            out[r, g0:g0 + group] = (q - zero) * scale
            is_tie[r, g0:g0 + group] = ((x / scale).frac().abs() - 0.5).abs() < 1e-4
    return out, is_tie


@pytest.mark.parametrize("bits,group,sym", list(itertools.product([2, 3, 4, 8], [16, None], [True, False])))
def test_rtn_matches_brute_force(bits, group, sym):
    torch.manual_seed(bits)
    w = torch.randn(6, 64)
    q, s, z = P.quantize_rtn(w, bits, group, sym=sym)
    g_idx = torch.arange(64) // (group or 64)
    got = P.dequantize_groups(q, s, z, g_idx)
    ref, is_tie = brute_force_rtn(w, bits, group or 64, sym)
    # Exact .5 ties (the symmetric range's own endpoint lands on one) may round either way in fp32.
    close = (got.double() - ref).abs() <= 1e-5 * (1 + ref.abs())
    assert bool((close | is_tie).all()) and float(is_tie.float().mean()) < 0.1
    assert int(q.min()) >= 0 and int(q.max()) <= 2**bits - 1
    # Error bounded by half a step (values inside the range; sym grids may clip the positive end by one step).
    step = s[:, g_idx]
    assert bool(((got - w).abs() <= step * (1.0 if sym else 0.5) + 1e-6).all())


def test_min_zero_keeps_grid_and_range():
    w = torch.rand(4, 32) + 0.1  # all positive: the plain asymmetric zero is 0
    _, _, z0 = P.quantize_rtn(w, 4, None, sym=False)
    assert int(z0.min()) == 0
    q, s, z = P.quantize_rtn(w, 4, None, sym=False, min_zero=1)
    assert int(z.min()) >= 1
    deq = P.dequantize_groups(q, s, z, torch.zeros(32, dtype=torch.long))
    assert float((deq - w).abs().max()) <= float(s.max()) / 2 + 1e-6  # the max still fits


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip_and_bit_layout(bits):
    torch.manual_seed(0)
    v = torch.randint(0, 2**bits, (64, 5), dtype=torch.int32)
    packed = P.pack_int32(v, bits)
    assert packed.shape == (64 * bits // 32, 5) and packed.dtype == torch.int32
    assert torch.equal(P.unpack_int32(packed, bits), v)
    # The bit stream by brute force: value j of a run of 32 at bit j * bits of a little-endian integer.
    for col in range(5):
        for run in range(2):
            stream = sum(int(v[run * 32 + j, col]) << (j * bits) for j in range(32))
            words = [(stream >> (32 * i)) & 0xFFFFFFFF for i in range(bits)]
            got = [int(x) & 0xFFFFFFFF for x in packed[run * bits:(run + 1) * bits, col]]
            assert got == words


def test_pack_matches_gptqmodel_3bit_layout():
    """GPTQModel's own packer (the 10 | 1 | 10 | 1 | 10 scheme) gives the same words as ours."""
    pytest.importorskip("gptqmodel")
    torch.manual_seed(1)
    v = torch.randint(0, 8, (32, 3), dtype=torch.int64)
    x = v
    mask = (1 << 32) - 1
    a = ((x[0:10] << (torch.arange(10).view(-1, 1) * 3)).sum(0)) & mask
    a = (a | ((x[10] << 30) & mask)) & mask
    b = ((x[10] >> 2) & 1) | ((x[11:21] << (torch.arange(10).view(-1, 1) * 3 + 1)).sum(0))
    b = (b | ((x[21] << 31) & mask)) & mask
    c = ((x[21] >> 1) & 0x3) | ((x[22:32] << (torch.arange(10).view(-1, 1) * 3 + 2)).sum(0))
    ref = torch.stack([a, b, c & mask])
    assert torch.equal(P.pack_int32(v, 3).to(torch.int64) & mask, ref)


def test_gptq_tensors_round_trip():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    q, s, z = P.quantize_rtn(w, 4, 32, sym=False, min_zero=1)
    g_idx = torch.arange(128) // 32
    t = P.pack_gptq(q, s, z, g_idx, 4)
    assert t["qweight"].shape == (16, 64) and t["qzeros"].shape == (4, 8) and t["scales"].shape == (4, 64)
    q2, s2, z2, g2 = P.unpack_gptq(t, 4)
    assert torch.equal(q2, q) and torch.equal(z2, z.to(torch.int32)) and torch.equal(g2, g_idx)
    torch.testing.assert_close(s2, s.half().float())
    with pytest.raises(ValueError, match="zero - 1"):
        P.pack_gptq(q, s, torch.zeros_like(z), g_idx, 4)


def test_bad_bits_and_group_size_are_config_errors():
    with pytest.raises(ConfigError, match="5 is not supported"):
        P.quantize_rtn(torch.randn(4, 32), 5, None, sym=True)
    with pytest.raises(ConfigError, match="does not divide the input dimension 48"):
        P.quantize_rtn(torch.randn(4, 48), 4, 32, sym=True)


def test_nf4_is_nearest_table_entry_times_absmax():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    packed, absmax = P.quantize_nf4(w, 64)
    deq = P.dequantize_nf4(packed, absmax, w.shape, 64)
    blocks = w.double().view(-1, 64)
    table = P.NF4_TABLE.double()
    am = blocks.abs().max(1).values
    ref = table[((blocks / am[:, None])[..., None] - table).abs().argmin(-1)] * am[:, None]
    torch.testing.assert_close(deq.double().view(-1, 64), ref, atol=1e-6, rtol=1e-6)


def test_nf4_and_double_quant_match_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    ref_packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    packed, absmax = P.quantize_nf4(w, 64)
    assert torch.equal(packed.view(-1), ref_packed.view(-1))
    torch.testing.assert_close(P.NF4_TABLE, state.code)
    torch.testing.assert_close(P.dynamic_map(), state.state2.code)
    codes, nested, offset = P.double_quantize_absmax(absmax, 256)
    torch.testing.assert_close(offset, state.offset)
    torch.testing.assert_close(nested, state.state2.absmax)
    # bitsandbytes' C search may pick the other side of a near-tie; ours is the nearest code, so never worse.
    x = (absmax - offset) / nested.repeat_interleave(256)[:absmax.numel()]
    code = P.dynamic_map()
    assert (codes == state.absmax).float().mean() >= 0.97
    assert bool(((code[codes.long()] - x).abs() <= (code[state.absmax.long()] - x).abs() + 1e-7).all())
    ours = P.dequantize_nf4(packed, P.dequantize_absmax(codes, nested, offset, 256), w.shape, 64)
    torch.testing.assert_close(ours, F.dequantize_4bit(ref_packed, state), atol=2e-2, rtol=0)
