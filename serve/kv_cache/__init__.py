"""Paged KV cache bookkeeping: which blocks hold which sequence's KV, shared and prefix-cached.

Pure Python, no tensors: the model runner owns the KV tensors, (num_blocks, block_size, kv_heads,
head_dim) per layer for K and for V, and reads them through `KVCacheManager.block_table`.

    prefix_cache.py   the chained block hash and the hit counters (what names a full block)
    block_pool.py     BlockPool: free list, ref counts, LRU of cached blocks, hash -> block index; sizing
    manager.py        KVCacheManager: per-sequence block tables, the scheduler's calls (see its docstring)
"""

from serve.kv_cache.block_pool import (BlockPool, KVCacheInvariantError, NoFreeBlocksError,
                                       kv_cache_bytes_per_block, num_blocks_for_memory_budget)
from serve.kv_cache.manager import BlockCopy, ComputedBlocks, KVCacheManager, SeqId
from serve.kv_cache.prefix_cache import (ROOT_BLOCK_HASH, BlockHash, ExtraKey, PrefixCacheStats,
                                         hash_block_tokens, hash_full_blocks)

__all__ = [
    "ROOT_BLOCK_HASH", "BlockCopy", "BlockHash", "BlockPool", "ComputedBlocks", "ExtraKey",
    "KVCacheInvariantError", "KVCacheManager", "NoFreeBlocksError", "PrefixCacheStats", "SeqId",
    "hash_block_tokens", "hash_full_blocks", "kv_cache_bytes_per_block", "num_blocks_for_memory_budget",
]
