"""The C kernels against torch references, and the fallback when they cannot be built."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from lifecycle.native_build import build_shared_library
from serve.worker import kernels
from serve.worker.attention import AttentionMetadata, paged_attention


@pytest.fixture(scope="module")
def cpu_kernels():
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on this machine: the engine runs on torch ops (tested elsewhere)")
    k = kernels.load()
    assert k is not None, kernels.status().reason  # a compiler is here: a failed build is a bug
    return k


def _reference(q, k_cache, v_cache, tables, starts, qlens, slens, bs, scale):
    out = torch.empty_like(q)
    for table, start, qlen, slen in zip(tables, starts, qlens, slens):
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(slen)])
        k, v = k_cache[slots].transpose(0, 1), v_cache[slots].transpose(0, 1)  # (kv_heads, slen, head_dim)
        qi = q[start:start + qlen].transpose(0, 1).double()  # (heads, qlen, head_dim), float64 reference
        mask = torch.arange(slen)[None, :] <= torch.arange(slen - qlen, slen)[:, None]  # (qlen, slen)
        o = F.scaled_dot_product_attention(qi, k.double(), v.double(), attn_mask=mask, scale=scale, enable_gqa=True)
        out[start:start + qlen] = o.transpose(0, 1).float()
    return out


# Block size 16 takes the 8-keys-at-a-time scores path, 4 only its scalar tail; head_dim 36 (not a multiple of 8) the
# scalar fallback throughout; q_scale 30 makes the softmax peaked, so most exponents underflow (the vector exp clamps).
@pytest.mark.parametrize("heads,kv_heads,head_dim,bs,q_scale", [(8, 4, 64, 4, 1.0), (8, 4, 64, 16, 1.0),
                                                               (4, 4, 32, 16, 1.0), (6, 1, 40, 4, 1.0),
                                                               (4, 2, 36, 16, 1.0), (8, 4, 64, 16, 30.0)])
def test_paged_attention_matches_float64_reference(cpu_kernels, heads, kv_heads, head_dim, bs, q_scale):
    gen = torch.Generator().manual_seed(heads * 100 + head_dim)
    num_blocks = 256 // bs
    k_cache = torch.randn(num_blocks * bs, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks * bs, kv_heads, head_dim, generator=gen)
    qlens, slens = [1, 5, 12, 1, 3], [37, 16, 12, 1, 30]  # decode, verify, whole prompt, first token, chunk
    perm = torch.randperm(num_blocks, generator=gen).tolist()  # scattered blocks: tables matter
    tables, used = [], 0
    for slen in slens:
        n = -(-slen // bs)
        tables.append(perm[used:used + n])
        used += n
    starts = [sum(qlens[:i]) for i in range(len(qlens))]
    q = torch.randn(sum(qlens), heads, head_dim, generator=gen) * q_scale
    scale = head_dim ** -0.5
    ref = _reference(q, k_cache, v_cache, tables, starts, qlens, slens, bs, scale)
    meta = AttentionMetadata.build(qlens, slens, tables, bs, torch.device("cpu"))
    got = paged_attention(q, k_cache, v_cache, meta, scale, cpu_kernels)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    # The torch path (gather + SDPA) agrees too.
    torch.testing.assert_close(paged_attention(q, k_cache, v_cache, meta, scale, None), ref, atol=2e-5, rtol=1e-4)


def test_attention_kernel_writes_only_the_given_sequences(cpu_kernels):
    q = torch.randn(3, 2, 8)
    cache = torch.randn(8, 2, 8)
    out = torch.full_like(q, 7.0)
    cpu_kernels.paged_attention(q, cache, cache, torch.tensor([[0]]), torch.tensor([1]), torch.tensor([1]),
                                torch.tensor([3]), 4, 0.5, out=out)
    assert torch.equal(out[0], torch.full_like(out[0], 7.0)) and torch.equal(out[2], out[0])
    assert not torch.equal(out[1], torch.full_like(out[1], 7.0))


# k = 203: the scalar dot-product path for every column; k = 256 with n = 78: the 4-column register tiles over 1-3
# rows of x at a time (m = 5: a 3-row and a 2-row pass) and the scalar path for the last 2 columns.
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("k,n", [(203, 77), (256, 78)])
def test_linear_small_m_matches_f_linear(cpu_kernels, m, with_bias, k, n):
    gen = torch.Generator().manual_seed(m)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if with_bias else None
    ref = F.linear(x.double(), w.double(), b.double() if b is not None else None).float()
    torch.testing.assert_close(cpu_kernels.linear_small_m(x, w, b), ref, atol=1e-4, rtol=1e-5)
    residual = torch.randn(m, n, generator=gen)  # accumulate: out += x @ w^T (+ b)
    torch.testing.assert_close(cpu_kernels.linear_small_m(x, w, b, out=residual.clone()), ref + residual,
                               atol=1e-4, rtol=1e-5)


def test_kernels_refuse_what_they_cannot_take(cpu_kernels):
    with pytest.raises(ValueError, match="fp32"):
        cpu_kernels.linear_small_m(torch.randn(1, 4, dtype=torch.float64), torch.randn(3, 4))
    with pytest.raises(ValueError, match="contiguous"):
        cpu_kernels.linear_small_m(torch.randn(4, 2).t(), torch.randn(3, 4))
    with pytest.raises(ValueError, match="does not fit"):
        cpu_kernels.linear_small_m(torch.randn(1, 4), torch.randn(3, 5))


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("LMFORGE_CPU_KERNELS", "0")
    lib, status = kernels._load()
    assert lib is None and not status.available and "LMFORGE_CPU_KERNELS=0" in status.reason


def test_no_compiler_falls_back(monkeypatch):
    monkeypatch.delenv("LMFORGE_CPU_KERNELS", raising=False)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    lib, status = kernels._load()
    assert lib is None and "build failed" in status.reason


def test_build_is_cached_and_keyed(cpu_kernels, tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_KERNEL_CACHE", str(tmp_path))
    compiler = shutil.which("cc") or shutil.which("gcc")
    build = lambda: build_shared_library(kernels.SOURCE, "lmforge_cpu_kernels.so", compiler,  # noqa: E731
                                         tuple(kernels.CFLAGS))
    first = build()
    mtime = first.stat().st_mtime_ns
    assert build() == first and first.stat().st_mtime_ns == mtime  # not rebuilt
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary left behind


def test_linear_accumulates_into_out(cpu_kernels):
    x, w, residual = torch.randn(3, 16), torch.randn(5, 16), torch.randn(3, 5)
    out = residual.clone()
    cpu_kernels.linear_small_m(x, w, out=out)
    torch.testing.assert_close(out, residual + F.linear(x, w), atol=1e-5, rtol=1e-5)


def test_elementwise_kernels_match_transformers_math(cpu_kernels):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 48, generator=gen)
    norm = LlamaRMSNorm(48, eps=1e-5)
    norm.weight.data = torch.randn(48, generator=gen)
    torch.testing.assert_close(cpu_kernels.rms_norm(x, norm.weight.data, 1e-5), norm(x).detach(), atol=1e-5, rtol=1e-5)

    heads, kv_heads, hd, rows = 4, 2, 16, 5
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * hd, generator=gen)
    positions = torch.tensor([0, 3, 7, 8, 30])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    emb = torch.cat([torch.outer(torch.arange(64).float(), inv_freq)] * 2, dim=-1)  # (64, hd)
    cos, sin = emb.cos(), emb.sin()
    q = qkv[:, :heads * hd].view(rows, heads, hd).transpose(0, 1)[None]  # (1, heads, rows, hd)
    k = qkv[:, heads * hd:(heads + kv_heads) * hd].view(rows, kv_heads, hd).transpose(0, 1)[None]
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos[positions][None], sin[positions][None])
    v_before = qkv[:, (heads + kv_heads) * hd:].clone()
    cpu_kernels.rope_(qkv, heads + kv_heads, hd, cos, sin, positions)
    torch.testing.assert_close(qkv[:, :heads * hd].view(rows, heads, hd), ref_q[0].transpose(0, 1))
    torch.testing.assert_close(qkv[:, heads * hd:(heads + kv_heads) * hd].view(rows, kv_heads, hd),
                               ref_k[0].transpose(0, 1))
    assert torch.equal(qkv[:, (heads + kv_heads) * hd:], v_before)  # values are not rotated

    gate_up = torch.randn(3, 2 * 40, generator=gen)
    torch.testing.assert_close(cpu_kernels.silu_mul(gate_up), F.silu(gate_up[:, :40]) * gate_up[:, 40:])

    k_cache, v_cache = torch.zeros(10, kv_heads, hd), torch.zeros(10, kv_heads, hd)
    slots = torch.tensor([9, 0, 4, 5, 1])
    cpu_kernels.write_kv(qkv, heads * hd, (heads + kv_heads) * hd, k_cache, v_cache, slots)
    assert torch.equal(k_cache[slots].view(rows, -1), qkv[:, heads * hd:(heads + kv_heads) * hd])
    assert torch.equal(v_cache[slots].view(rows, -1), qkv[:, (heads + kv_heads) * hd:])
    assert k_cache[2].abs().sum() == 0  # untouched slots stay untouched


@pytest.mark.parametrize("m", [1, 3, 5])
@pytest.mark.parametrize("k,n", [(203, 77), (256, 78)])
def test_linear_small_m_reads_bf16_weights(cpu_kernels, m, k, n):
    """bf16 weights (a draft's compact copy): widened exactly, summed in fp32."""
    gen = torch.Generator().manual_seed(m + k)
    x, w, b = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
    w16 = w.to(torch.bfloat16)
    ref = F.linear(x.double(), w16.double(), b.double()).float()
    torch.testing.assert_close(cpu_kernels.linear_small_m(x, w16, b), ref, atol=1e-4, rtol=1e-5)
