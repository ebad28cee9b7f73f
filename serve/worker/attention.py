"""Attention over a paged KV cache.

The model runner flattens the step's tokens of all sequences into one (num_tokens,) batch. Each
sequence i contributes `query_lens[i]` new tokens (a prefill chunk, one decode token, or 1 + k
speculative drafts) at the end of a context of `seq_lens[i]` tokens whose K/V live in the blocks of
`block_tables[i]`. Position p of a sequence is stored at slot `table[p // block_size] * block_size +
p % block_size` of the cache (vLLM's PagedAttention layout, Kwon et al. 2023, section 4.1).

`AttentionMetadata` is built once per step by the runner and passed down explicitly (no hidden
global context between runner and attention).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from serve.worker.kernels import CpuKernels

# With the CPU kernel, sequences computing at most this many tokens this step (decodes, speculative
# verification, short chunks) attend in the kernel; longer prefill chunks go to SDPA, whose blocked matrix
# products beat the kernel's per-query loop there (docs/BENCHMARKS.md, "attention paths").
KERNEL_MAX_QUERY_LEN = 16


@dataclass
class AttentionMetadata:
    """Per-step layout of the flat token batch; every tensor lives on the model's device."""

    query_lens: list[int]  # new tokens per sequence this step
    seq_lens: list[int]  # context length per sequence after this step (computed + new)
    query_starts: list[int]  # offset of each sequence's first new token in the flat batch
    slot_mapping: torch.Tensor  # (num_tokens,) int64: cache slot of every new token
    block_tables: torch.Tensor  # (num_seqs, max_blocks) int64, padded with block 0 (masked out)
    block_size: int
    is_all_decode: bool
    # The sequences the CPU kernel takes (query_len <= KERNEL_MAX_QUERY_LEN: decodes, speculative verification,
    # small chunks) as int64 tensors, built once per step rather than once per layer.
    kernel_seqs: list[int] = field(default_factory=list)
    kernel_block_tables: torch.Tensor | None = None  # (len(kernel_seqs), max_blocks)
    kernel_query_starts: torch.Tensor | None = None  # (len(kernel_seqs),)
    kernel_query_lens: torch.Tensor | None = None
    kernel_seq_lens: torch.Tensor | None = None

    @classmethod
    def build(cls, query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]], block_size: int,
              device: torch.device) -> "AttentionMetadata":
        starts, slots = [], []
        offset = 0
        for qlen, slen, table in zip(query_lens, seq_lens, block_tables):
            starts.append(offset)
            offset += qlen
            for pos in range(slen - qlen, slen):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        max_blocks = max(len(t) for t in block_tables)
        padded = [t + [0] * (max_blocks - len(t)) for t in block_tables]
        tables = torch.tensor(padded, dtype=torch.int64, device=device)  # (num_seqs, max_blocks)
        is_all_decode = all(q == 1 for q in query_lens)
        as_i64 = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)  # noqa: E731
        short = [i for i, q in enumerate(query_lens) if q <= KERNEL_MAX_QUERY_LEN]
        every = len(short) == len(query_lens)  # decode and verification steps: no re-indexing
        return cls(query_lens=query_lens, seq_lens=seq_lens, query_starts=starts, slot_mapping=as_i64(slots),
                   block_tables=tables, block_size=block_size, is_all_decode=is_all_decode,
                   kernel_seqs=short, kernel_block_tables=tables if every else tables[as_i64(short)].contiguous(),
                   kernel_query_starts=as_i64(starts if every else [starts[i] for i in short]),
                   kernel_query_lens=as_i64(query_lens if every else [query_lens[i] for i in short]),
                   kernel_seq_lens=as_i64(seq_lens if every else [seq_lens[i] for i in short]))

    def decode_mask(self) -> torch.Tensor:
        """The torch decode path's key-padding mask over the padded tables (num_seqs, 1, 1, max_blocks * block_size)
        bool; built when that path asks (the CPU kernels read the lengths instead)."""
        device = self.block_tables.device
        key_pos = torch.arange(self.block_tables.shape[1] * self.block_size, device=device)  # (max_len,)
        lens = torch.tensor(self.seq_lens, device=device)  # (num_seqs,)
        return (key_pos[None, :] < lens[:, None])[:, None, None, :]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' K/V. Caches: (num_blocks * block_size, num_kv_heads, head_dim)."""
    k_cache.index_copy_(0, slot_mapping, k)  # k: (num_tokens, num_kv_heads, head_dim)
    v_cache.index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, kernels: CpuKernels | None = None) -> torch.Tensor:
    """Causal attention of the new tokens over their sequences' cached context.

    q: (num_tokens, num_heads, head_dim); caches as in `write_kv` (already holding this step's K/V).
    Returns (num_tokens, num_heads, head_dim). With `kernels` (fp32 on CPU), one call reads K/V in place through
    the block tables; otherwise blocks are gathered into contiguous tensors for torch's SDPA.
    """
    if kernels is None and meta.is_all_decode:
        return _decode_attention(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    if kernels is not None and meta.kernel_seqs:
        kernels.paged_attention(q, k_cache, v_cache, meta.kernel_block_tables, meta.kernel_query_starts,
                                meta.kernel_query_lens, meta.kernel_seq_lens, meta.block_size, scale, out=out)
    done = set(meta.kernel_seqs) if kernels is not None else set()
    bs = meta.block_size
    for i, (start, qlen, slen) in enumerate(zip(meta.query_starts, meta.query_lens, meta.seq_lens)):
        if i in done:
            continue
        table = meta.block_tables[i, :-(-slen // bs)]  # (num_blocks,)
        k = _gather_blocks(k_cache, table, bs)[:slen].transpose(0, 1)  # (kv_heads, slen, head_dim)
        v = _gather_blocks(v_cache, table, bs)[:slen].transpose(0, 1)  # (kv_heads, slen, head_dim)
        qi = q[start:start + qlen].transpose(0, 1)  # (heads, qlen, head_dim)
        # 4-D (batch of one): torch's CPU SDPA takes its fused flash kernel for 4-D inputs and the slower
        # math path for 3-D ones (2x per call on a 128-token prompt here).
        qi, k, v = qi[None], k[None], v[None]  # (1, heads or kv_heads, len, head_dim)
        if qlen == slen:  # a whole prompt in one chunk: plain causal
            o = F.scaled_dot_product_attention(qi, k, v, is_causal=True, scale=scale, enable_gqa=True)
        elif qlen == 1:  # one new token sees everything before it
            o = F.scaled_dot_product_attention(qi, k, v, scale=scale, enable_gqa=True)
        else:  # a chunk after cached context: query j sits at position slen - qlen + j
            q_pos = torch.arange(slen - qlen, slen, device=q.device)  # (qlen,)
            mask = torch.arange(slen, device=q.device)[None, :] <= q_pos[:, None]  # (qlen, slen)
            o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start:start + qlen] = o[0].transpose(0, 1)  # (qlen, heads, head_dim)
    return out


def _gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """Copy whole blocks out of a (num_slots, kv_heads, head_dim) cache -> (len(block_ids) * block_size, kv_heads,
    head_dim). `index_select` over block rows copies contiguous runs; advanced indexing was ~4x slower here."""
    kv_heads, head_dim = cache.shape[1], cache.shape[2]
    rows = cache.view(-1, block_size * kv_heads * head_dim)  # (num_blocks, block_size * kv_heads * head_dim)
    return rows.index_select(0, block_ids).view(-1, kv_heads, head_dim)


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                      scale: float) -> torch.Tensor:
    """One query token per sequence: gather every sequence's blocks (padded) and attend in one call."""
    num_seqs, max_blocks = meta.block_tables.shape
    bs = meta.block_size
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2]
    k = _gather_blocks(k_cache, meta.block_tables.reshape(-1), bs).view(num_seqs, max_blocks * bs, kv_heads, head_dim)
    v = _gather_blocks(v_cache, meta.block_tables.reshape(-1), bs).view(num_seqs, max_blocks * bs, kv_heads, head_dim)
    qb = q[:, None].transpose(1, 2)  # (B, heads, 1, head_dim)
    o = F.scaled_dot_product_attention(qb, k.transpose(1, 2), v.transpose(1, 2), attn_mask=meta.decode_mask(),
                                       scale=scale, enable_gqa=True)  # (B, heads, 1, head_dim)
    return o[:, :, 0]  # (B, heads, head_dim)
