"""Every runtime linear computes F.linear(x, dequantized W): our C kernels, torch's packed matmuls, the fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quant import kernels, primitives as P
from quant.linear import DequantLinear, Int4Linear, Int8Linear, LowbitLinear, NF4Linear, grid_linear, nf4_linear


@pytest.fixture(autouse=True)
def exact_q4_activations(monkeypatch):
    """The kernels' exact path (fp32 activations) for one-row 4-bit GEMVs unless a test sets otherwise; the default,
    int8-rounded activations, has its own tests below."""
    monkeypatch.setenv("LMFORGE_Q4_ACTIVATIONS", "fp32")


def _grid(bits, group, sym, n=48, k=128, act_order=False, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(n, k)
    q, s, z = P.quantize_rtn(w, bits, group, sym=sym)
    g_idx = torch.arange(k) // (group or k)
    if act_order:  # a permuted column -> group map, as GPTQ with act-order writes it
        perm = torch.randperm(k)
        q, g_idx = q[:, perm], g_idx[perm]
    return q, s, z, g_idx


@pytest.mark.parametrize("rows", [1, 3, 8, 20])
@pytest.mark.parametrize("bits,group,sym,act_order", [(4, 32, True, False), (4, 64, False, True), (3, 32, False, False),
                                                      (2, None, True, False), (8, None, False, False),
                                                      (8, None, True, False)])
def test_lowbit_kernels_match_dequantized_linear(rows, bits, group, sym, act_order):
    lib = kernels.load()
    if lib is None:
        pytest.skip(f"no C kernels here: {kernels.status()}")
    q, s, z, g = _grid(bits, group, sym, act_order=act_order)
    ref_w = P.dequantize_groups(q, s, z, g)
    lin = LowbitLinear(lib, q, s, z, g, bits)
    torch.testing.assert_close(lin.dequantize(), ref_w, atol=1e-5, rtol=1e-5)
    x, bias = torch.randn(rows, 128), torch.randn(48)
    torch.testing.assert_close(lin(x, bias), F.linear(x, ref_w, bias), atol=1e-4, rtol=1e-4)
    assert isinstance(grid_linear(q, s, z, g, bits, torch.float32), LowbitLinear)


@pytest.mark.parametrize("bits,group,act_order", [(4, 32, False), (3, 64, True), (4, None, False)])
def test_torch_int4_packed_matmul_matches(bits, group, act_order):
    q, s, z, g = _grid(bits, group, sym=False, act_order=act_order)
    lin = Int4Linear(q, s, z, g, torch.float32)
    x = torch.randn(5, 128)
    torch.testing.assert_close(lin(x), F.linear(x, P.dequantize_groups(q, s, z, g)), atol=1e-3, rtol=1e-3)


def test_torch_int8_packed_matmul_with_zero_correction():
    q, s, z, g = _grid(8, None, sym=False)
    lin = Int8Linear(q, s[:, 0], z[:, 0], torch.float32)
    x = torch.randn(5, 128)
    torch.testing.assert_close(lin(x), F.linear(x, P.dequantize_groups(q, s, z, g)), atol=1e-3, rtol=1e-3)


def test_fallback_when_no_kernel_fits(monkeypatch):
    monkeypatch.setattr(kernels, "load", lambda: None)
    q, s, z, g = _grid(8, 32, sym=True)  # grouped 8-bit: no kernel in torch either
    lin = grid_linear(q, s, z, g, 8, torch.float32)
    assert isinstance(lin, DequantLinear) and "dequantize-on-the-fly" in lin.path
    x = torch.randn(2, 128)
    torch.testing.assert_close(lin(x), F.linear(x, P.dequantize_groups(q, s, z, g)))
    assert isinstance(grid_linear(*_grid(4, 32, sym=True), 4, torch.float32), Int4Linear)


@pytest.mark.parametrize("rows", [1, 2, 8, 20])
@pytest.mark.parametrize("block", [64, 128])
def test_nf4_kernel_matches_dequantized_linear(rows, block):
    """Two NF4 linears stacked (as q/k/v are): the kernel equals F.linear on bitsandbytes-layout dequantization."""
    lib = kernels.load()
    if lib is None:
        pytest.skip(f"no C kernels here: {kernels.status()}")
    torch.manual_seed(1)
    ws = [torch.randn(48, 256), torch.randn(16, 256) * 3]
    parts = [(*P.quantize_nf4(w, block), tuple(w.shape), block) for w in ws]
    ref_w = torch.cat([P.dequantize_nf4(*p) for p in parts])  # (64, 256)
    lin = nf4_linear(parts, torch.float32)
    assert isinstance(lin, NF4Linear) and "nf4 weight-only GEMV" in lin.path
    torch.testing.assert_close(lin.dequantize(), ref_w)
    x, bias = torch.randn(rows, 256), torch.randn(64)
    torch.testing.assert_close(lin(x, bias), F.linear(x, ref_w, bias), atol=1e-4, rtol=1e-4)


def test_nf4_falls_back_without_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "load", lambda: None)
    w = torch.randn(32, 128)
    parts = [(*P.quantize_nf4(w, 64), tuple(w.shape), 64)]
    lin = nf4_linear(parts, torch.float32)
    assert isinstance(lin, DequantLinear) and "dequantize-on-the-fly (nf4" in lin.path
    x = torch.randn(3, 128)
    torch.testing.assert_close(lin(x), F.linear(x, P.dequantize_nf4(*parts[0])))


def test_nf4_blocks_spanning_rows_fall_back_and_say_why():
    """The `small` preset's down_proj has K = 1376 = 21.5 x 64: its NF4 blocks cross rows, which the kernel does
    not handle; the dequantize path must still be exact and name the reason."""
    w = torch.randn(8, 96)  # 96 = 1.5 blocks of 64
    parts = [(*P.quantize_nf4(w, 64), tuple(w.shape), 64)]
    lin = nf4_linear(parts, torch.float32)
    assert isinstance(lin, DequantLinear)
    if kernels.load() is not None:
        assert "nf4 blocks of 64 span rows of 96" in lin.path
    x = torch.randn(1, 96)
    torch.testing.assert_close(lin(x), F.linear(x, P.dequantize_nf4(*parts[0])))


def _int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x (1, k) rounded to int8 codes per 32 columns, d = max|x| / 127, returned as d * code (what the kernel sees)."""
    blocks = x.view(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    codes = torch.where(d > 0, torch.round(blocks / torch.where(d > 0, d, 1)), torch.zeros_like(blocks))
    assert codes.abs().max() <= 127
    return (codes * d).view_as(x)


@pytest.mark.parametrize("bits,group,sym,act_order,k", [(4, 32, True, False, 128), (4, 128, False, False, 256),
                                                          (4, 64, False, True, 128), (3, None, False, False, 96),
                                                          (4, 32, False, False, 160)])
def test_q4_int8_activation_kernel_matches_its_reference(bits, group, sym, act_order, k, monkeypatch):
    """LMFORGE_Q4_ACTIVATIONS=int8: one row of x rounded to int8 per 32 columns, the zero-point term on the exact
    x; equal to that reference up to float summation order, and within the rounding's bound of the exact result.
    The kernel's paths: two blocks per step with group % 64 == 0 (128, 64) and with group 32 (own scale per block;
    K = 160: an odd last block), one block per step otherwise (per channel, K = 96: three blocks per group)."""
    lib = kernels.load()
    if lib is None:
        pytest.skip(f"no C kernels here: {kernels.status()}")
    monkeypatch.setenv("LMFORGE_Q4_ACTIVATIONS", "int8")
    torch.manual_seed(3)
    w = torch.randn(48, k)
    q, s, z = P.quantize_rtn(w, bits, group, sym=sym, min_zero=0 if sym else 1)
    g = torch.arange(k) // (group or k)
    if act_order:
        perm = torch.randperm(k)
        q, g = q[:, perm], g[perm]
    lin = LowbitLinear(lib, q, s, z, g, bits)
    assert lin.int8_activations and "int8-activation" in lin.path
    x, bias = torch.randn(1, k) * 3, torch.randn(48)
    x[0, :32] = 0.0  # an all-zero block: scale 0, codes 0
    qs = q.float() * s[:, g]  # (N, K) the integer part, scaled
    off = -z[:, g].float() * s[:, g]  # (N, K) the zero-point part
    xp = x if lin.perm is None else x[:, lin.perm]
    x_hat = _int8_blocks(xp)
    x_hat = x_hat if lin.perm is None else x_hat[:, torch.argsort(lin.perm)]
    ref = F.linear(x_hat, qs) + F.linear(x, off) + bias
    got = lin(x, bias)
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-4)
    exact = F.linear(x, P.dequantize_groups(q, s, z, g), bias)
    assert (got - exact).abs().max() > 1e-5  # it really rounded the activations ...
    bound = (qs.abs() @ ((x - x_hat).abs()[0])).max()  # ... and by no more than the rounding allows
    assert (got - exact).abs().max() <= bound + 1e-3
    assert lin(torch.randn(3, k), bias).shape == (3, 48)  # more rows: the fp32 kernel


def test_q4_activations_setting_is_checked(monkeypatch):
    from lifecycle.errors import ConfigError
    from quant.linear import q4_int8_activations

    monkeypatch.setenv("LMFORGE_Q4_ACTIVATIONS", "int4")
    with pytest.raises(ConfigError, match="LMFORGE_Q4_ACTIVATIONS='int4'"):
        q4_int8_activations()
    monkeypatch.delenv("LMFORGE_Q4_ACTIVATIONS")
    assert q4_int8_activations()  # the default: one-row 4-bit GEMVs on int8-rounded activations
    monkeypatch.setenv("LMFORGE_Q4_ACTIVATIONS", "fp32")
    assert not q4_int8_activations()
    assert q4_int8_activations("int8") and not q4_int8_activations("fp32")  # EngineConfig.q4_activations wins
    with pytest.raises(ConfigError, match="--q4-activations: 'int4'"):
        q4_int8_activations("int4")


@pytest.mark.parametrize("kind", ["q4", "q4-asym", "q8", "q8-asym", "nf4"])
def test_tiled_dequantize_equals_torch_dequantize_bit_for_bit(kind):
    """Steps of many rows (prefill, batches above 8) dequantize tiles of weight rows in C and run torch's GEMM on each.
    The C dequantizers compute what dequantize() does in torch (multiply, then add), so the weights are identical and
    the output equals F.linear on the dequantized matrix, for tiles that do not divide the output rows."""
    lib = kernels.load()
    if lib is None:
        pytest.skip(f"no C kernels here: {kernels.status()}")
    n, k = 50, 128
    if kind == "nf4":
        torch.manual_seed(2)
        w = torch.randn(n, k)
        lin = nf4_linear([(*P.quantize_nf4(w, 64), (n, k), 64)], torch.float32)
        weights = dict(qw=lin.qw, scale=lin.absmax, extra=lin.table, block=lin.block)
    else:
        bits = 4 if kind.startswith("q4") else 8
        q, s, z, g = _grid(bits, 32 if bits == 4 else None, sym=not kind.endswith("asym"), n=n, k=k)
        lin = LowbitLinear(lib, q, s, z, g, bits)
        weights = (dict(qw=lin.qw, scale=lin.scale, extra=lin.offset, block=lin.group) if bits == 4
                   else dict(qw=lin.qw, scale=lin.scale, extra=lin.corr, block=0))
        if bits == 8:
            assert (lin.corr is not None) == kind.endswith("asym")
    ref_w = lin.dequantize()
    for r0, r1 in [(0, n), (0, 7), (13, 50), (49, 50)]:
        out = torch.full((r1 - r0, k), float("nan"))
        lib.dequantize_rows(kind.split("-")[0], out, r0, r1, **weights)
        assert torch.equal(out, ref_w[r0:r1])
    x, bias = torch.randn(37, k), torch.randn(n)
    for tile_bytes in (4 * k * 8, 4 * k * 24, 1 << 20):  # tiles of 8 rows (7 tiles, last of 2), 24 rows, one tile
        y = lib.tiled_linear(x, kind.split("-")[0], n, bias, tile_bytes=tile_bytes, **weights)
        torch.testing.assert_close(y, F.linear(x, ref_w, bias), atol=1e-5, rtol=1e-5)
    y3 = lin(x.view(1, 37, k), bias)  # the module: 3-D input, > 8 rows -> tiled
    assert y3.shape == (1, 37, n)
    torch.testing.assert_close(y3[0], F.linear(x, ref_w, bias), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="bad shapes"):
        lib.dequantize_rows(kind.split("-")[0], torch.empty(3, k), 0, 4, **weights)
