"""ModelRunner: turns a SchedulerOutput into one forward pass over the paged KV cache.

It owns the device tensors (weights, KV caches) and nothing else: which sequences run and how many
tokens each computes is the scheduler's decision; what to do with the logits is the engine's.
Device handling: CUDA when available (bf16), otherwise CPU (fp32); both overridable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from serve.engine.scheduler import SchedulerOutput
from serve.kv_cache.block_pool import kv_cache_bytes_per_block, num_blocks_for_memory_budget
from serve.worker.attention import AttentionMetadata
from serve.worker.llama import LlamaDecoder

DEFAULT_KV_CACHE_BYTES = 1 << 30  # 1 GiB: ~130k tokens of the `small` preset in fp32


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class ModelRunnerOutput:
    """Logits the engine needs from this step, in fp32.

    `sample_indices` are the items that computed their last token. Item `sample_indices[j]` owns
    `num_sample_rows[j]` consecutive rows of `sample_logits`: 1 (its next-token distribution) plus one
    per speculative draft it verifies (row r scores the token after its last token + drafts[:r], so
    the rows are p_1..p_{k+1} of the speculative sampling rule). `prompt_logits[i]` holds, for
    scheduled item i that asked for prompt logprobs, the logits at each of its new positions (row r
    predicts the token after it).
    """

    sample_indices: list[int]
    sample_logits: torch.Tensor  # (sum(num_sample_rows), vocab)
    prompt_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # item -> (num_new_tokens, vocab)
    num_sample_rows: list[int] = field(default_factory=list)  # per sample_indices entry: 1 + num drafts


class ModelRunner:
    def __init__(self, model_path: str | Path, *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, block_size: int = 16,
                 kv_cache_memory_bytes: int | None = None, num_blocks: int | None = None,
                 use_cpu_kernels: bool = True, packed_weights: bool = True, q4_activations: str | None = None) -> None:
        self.device = resolve_device(device)
        self.model = LlamaDecoder.from_pretrained(model_path, device=self.device, dtype=dtype,
                                                  use_cpu_kernels=use_cpu_kernels, packed_weights=packed_weights,
                                                  q4_activations=q4_activations)
        cfg = self.model.cfg
        self.block_size = block_size
        self.bytes_per_block = kv_cache_bytes_per_block(
            num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            block_size=block_size, dtype_bytes=torch.finfo(self.model.dtype).bits // 8)
        if num_blocks is None:
            num_blocks = num_blocks_for_memory_budget(
                self.bytes_per_block, memory_budget_bytes=kv_cache_memory_bytes or DEFAULT_KV_CACHE_BYTES)
        self.num_blocks = num_blocks
        shape = self.model.kv_cache_shape(num_blocks, block_size)
        self.kv_caches = [(torch.zeros(shape, dtype=self.model.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.model.dtype, device=self.device))
                          for _ in range(cfg.num_layers)]

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.vocab_size

    @property
    def max_model_len(self) -> int:
        return self.model.cfg.max_position_embeddings

    def execute(self, sched: SchedulerOutput, block_tables: list[list[int]],
                wants_prompt_logits: list[bool]) -> ModelRunnerOutput:
        """One forward pass. `block_tables[i]` and `wants_prompt_logits[i]` belong to `sched.scheduled[i]`."""
        chunks = []
        for item in sched.scheduled:
            seq, start = item.seq, item.seq.num_computed_tokens
            # Drafts are just more tokens to compute: they follow the sequence's own tokens.
            new_ids = seq.token_ids[start:start + item.num_new_tokens - item.num_drafts] + item.draft_token_ids
            chunks.append((new_ids, start))
        hidden, meta = self.forward(chunks, block_tables)  # (num_tokens, hidden)
        # Project only the rows someone needs onto the vocabulary.
        sample_indices = [i for i, item in enumerate(sched.scheduled) if item.completes_sequence]
        num_sample_rows = [1 + sched.scheduled[i].num_drafts for i in sample_indices]
        ends = [meta.query_starts[i] + meta.query_lens[i] for i in sample_indices]
        rows = [row for end, num in zip(ends, num_sample_rows) for row in range(end - num, end)]
        sample_logits = self.model.logits(hidden[rows]) if rows else hidden.new_zeros((0, self.vocab_size))
        prompt_logits = {}
        for i, wants in enumerate(wants_prompt_logits):
            if wants:
                prompt_rows = slice(meta.query_starts[i], meta.query_starts[i] + meta.query_lens[i])
                prompt_logits[i] = self.model.logits(hidden[prompt_rows])
        return ModelRunnerOutput(sample_indices, sample_logits, prompt_logits, num_sample_rows)

    def forward(self, chunks: list[tuple[list[int], int]], block_tables: list[list[int]],
                ) -> tuple[torch.Tensor, AttentionMetadata]:
        """The bare forward pass: `chunks[i] = (new token ids, position of the first)` of sequence i, whose
        KV goes to (and context is read from) `block_tables[i]`. Returns hidden states (num_tokens, hidden)
        in chunk order, and the metadata (its `query_starts` locate each chunk's rows)."""
        input_ids: list[int] = []
        positions: list[int] = []
        query_lens, seq_lens = [], []
        for new_ids, start in chunks:
            input_ids.extend(new_ids)
            positions.extend(range(start, start + len(new_ids)))
            query_lens.append(len(new_ids))
            seq_lens.append(start + len(new_ids))
        meta = AttentionMetadata.build(query_lens, seq_lens, block_tables, self.block_size, self.device)
        hidden = self.model.forward(torch.tensor(input_ids, device=self.device),
                                    torch.tensor(positions, device=self.device), self.kv_caches, meta)
        return hidden, meta

    def copy_block(self, src_block_id: int, dst_block_id: int) -> None:
        """Copy-on-write for n > 1: the child's last, partial block starts as the parent's."""
        bs = self.block_size
        for k_cache, v_cache in self.kv_caches:
            k_cache[dst_block_id * bs:(dst_block_id + 1) * bs] = k_cache[src_block_id * bs:(src_block_id + 1) * bs]
            v_cache[dst_block_id * bs:(dst_block_id + 1) * bs] = v_cache[src_block_id * bs:(src_block_id + 1) * bs]
