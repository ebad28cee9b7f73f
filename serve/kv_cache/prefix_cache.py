"""What identifies a full KV block for prefix caching: a hash chained over the previous block's hash.

vLLM's automatic prefix caching (docs/design/prefix_caching.md, "v1" design) names a full block by
`hash((parent_block_hash, block_token_ids, extra_keys))`. Because the parent hash is inside, a block's
hash identifies the *whole prefix* up to its last token, so the same 16 tokens after a different
prefix get a different hash: their KV differs (attention saw different context), and must not be shared.

The hash is sha256 over a canonical byte encoding, not Python's `hash()`: a 64-bit hash of tuples can be
made to collide on purpose, and then a crafted prompt reads another request's KV (vLLM advisory
GHSA-rm76-4mrf-v9r8, PR #12621; sha256 since PR #15297, vLLM's default since v0.10.2). sha256 has no
practical collisions, needs no `PYTHONHASHSEED`, and costs 1.5-3.5 µs per 16-token block here (without /
with a tuple extra key), nothing next to a forward pass. Hashes live only in process memory; the encoding is still fixed (int64 little-endian
tokens, a tagged and length-prefixed extra key) so it never depends on the platform.

Only FULL blocks are hashed: the last partial block of a sequence keeps changing and is never shared.

The hash -> block map lives in `BlockPool` (eviction must drop a hash atomically with reusing its block);
this file holds the pure hashing and the hit counters.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType, TypeAlias

BlockHash = NewType("BlockHash", bytes)  # 32-byte sha256 digest

# What else, besides the tokens, decides a block's KV: the model/LoRA adapter name, a cache salt
# (per-tenant isolation), multimodal input hashes. Requests whose extra keys differ never share blocks.
# Tag each part, e.g. (("lora", name), ("salt", salt)): untagged parts let a LoRA named "x" collide
# with a salt "x" (vLLM issue #44701).
ExtraKey: TypeAlias = "None | bool | int | str | bytes | tuple[ExtraKey, ...]"

# Parent of the first block of every sequence: a fixed constant, so the chain has no special case.
ROOT_BLOCK_HASH = BlockHash(hashlib.sha256(b"lmforge/serve/kv_cache/prefix-cache/v1").digest())


def _encode_extra_key(value: ExtraKey) -> bytes:
    """Canonical, injective bytes of an extra key: a type tag, then a length prefix, then the payload."""
    if value is None:
        return b"N"
    if isinstance(value, bool):  # before int: True must not encode as 1
        return b"B1" if value else b"B0"
    if isinstance(value, int):
        payload = str(value).encode()
        return b"I" + struct.pack("<Q", len(payload)) + payload
    if isinstance(value, str):
        payload = value.encode("utf-8")
        return b"S" + struct.pack("<Q", len(payload)) + payload
    if isinstance(value, bytes):
        return b"Y" + struct.pack("<Q", len(value)) + value
    if isinstance(value, tuple):
        return b"T" + struct.pack("<Q", len(value)) + b"".join(_encode_extra_key(v) for v in value)
    raise TypeError(f"prefix-cache extra_key must be None, bool, int, str, bytes or a tuple of those; "
                    f"got {type(value).__name__} {value!r}")


def hash_block_tokens(parent_block_hash: BlockHash | None, token_ids: Sequence[int],
                      extra_key: ExtraKey = None) -> BlockHash:
    """sha256(parent hash ‖ number of tokens ‖ tokens as int64 LE ‖ extra key); `None` parent = first block."""
    parent = ROOT_BLOCK_HASH if parent_block_hash is None else parent_block_hash
    digest = hashlib.sha256(parent)
    digest.update(struct.pack(f"<Q{len(token_ids)}q", len(token_ids), *token_ids))
    digest.update(_encode_extra_key(extra_key))
    return BlockHash(digest.digest())


def hash_full_blocks(token_ids: Sequence[int], block_size: int, extra_key: ExtraKey = None, *,
                     start_block: int = 0, parent_block_hash: BlockHash | None = None,
                     max_num_blocks: int | None = None) -> list[BlockHash]:
    """Chained hashes of the full blocks `start_block, start_block + 1, …` of `token_ids`.

    `parent_block_hash` is the hash of block `start_block - 1` (None when starting at block 0), so a
    caller extends a sequence's chain without rehashing its prefix. The trailing partial block is skipped.
    """
    if (start_block == 0) != (parent_block_hash is None):
        raise ValueError(f"parent_block_hash must be given exactly when start_block > 0 "
                         f"(start_block={start_block}, parent given: {parent_block_hash is not None})")
    num_full_blocks = len(token_ids) // block_size
    if max_num_blocks is not None:
        num_full_blocks = min(num_full_blocks, start_block + max_num_blocks)
    block_hashes: list[BlockHash] = []
    parent = parent_block_hash
    for block_index in range(start_block, num_full_blocks):
        parent = hash_block_tokens(parent, token_ids[block_index * block_size:(block_index + 1) * block_size],
                                   extra_key)
        block_hashes.append(parent)
    return block_hashes


@dataclass(slots=True)
class PrefixCacheStats:
    """Cumulative counters, in tokens, counted once per admitted sequence (not per lookup attempt).

    `num_queried_tokens` is the admitted sequence's length; `num_hit_tokens` how many of them were found
    cached and skipped. Their ratio is vLLM's `prefix_cache_hits / prefix_cache_queries`.
    """

    num_queries: int = 0  # admissions that asked the cache (sequences, not tokens)
    num_queried_tokens: int = 0
    num_hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def record(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        self.num_queries += 1
        self.num_queried_tokens += num_queried_tokens
        self.num_hit_tokens += num_hit_tokens
