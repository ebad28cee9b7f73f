"""Run an exported decoder graph with plain onnxruntime: greedy decoding through the KV cache (the path a server
takes) and whole-sequence logits (perplexity). Used by the export's parity check and perplexity report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lifecycle.onnx_export.graph import PAST_KEY, PAST_VALUE, cache_shape


class OnnxDecoder:
    def __init__(self, path: Path, config: dict[str, Any], *, num_threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.num_layers, self.kv_heads, self.head_dim = cache_shape(config)
        past_type = next(i.type for i in self.session.get_inputs() if i.name == PAST_KEY % 0)
        self.cache_dtype = np.float16 if past_type == "tensor(float16)" else np.float32

    def forward(self, input_ids: np.ndarray, past: list[np.ndarray] | None) -> tuple[np.ndarray, list[np.ndarray]]:
        """input_ids (batch, seq) after `past` (each (batch, kv_heads, past_seq, head_dim), None: empty)
        -> logits (batch, seq, vocab) as float32, present cache."""
        batch, seq = input_ids.shape
        if past is None:
            past = [np.zeros((batch, self.kv_heads, 0, self.head_dim), self.cache_dtype)] * (2 * self.num_layers)
        past_seq = past[0].shape[2]
        mask = np.ones((batch, past_seq + seq), np.int64)
        positions = np.broadcast_to(np.arange(past_seq, past_seq + seq), (batch, seq)).astype(np.int64)
        return self.run(input_ids, mask, positions, past)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
            past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call of the graph with every input explicit (padded batches: zeros in attention_mask)."""
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask,
                 "position_ids": position_ids}
        for i in range(self.num_layers):
            feeds[PAST_KEY % i], feeds[PAST_VALUE % i] = past[2 * i], past[2 * i + 1]
        logits, *present = self.session.run(None, feeds)
        return logits.astype(np.float32), present

    def greedy(self, prompt: Sequence[int], num_tokens: int) -> tuple[list[int], np.ndarray]:
        """Greedy tokens one at a time through the cache -> (tokens, (num_tokens, vocab) logits they came from)."""
        logits, past = self.forward(np.asarray([prompt]), None)
        tokens, rows = [], []
        for _ in range(num_tokens):
            row = logits[0, -1]  # (vocab,)
            rows.append(row)
            tokens.append(int(row.argmax()))
            logits, past = self.forward(np.asarray([[tokens[-1]]]), past)
        return tokens, np.stack(rows)

    def perplexity(self, blocks: np.ndarray, *, progress: bool = True, desc: str = "perplexity (onnx)") -> float:
        """exp(mean NLL) of every token after the first of each (num_blocks, seq_len) block, as quant.report's."""
        from tqdm.auto import tqdm

        total_nll, count = 0.0, 0
        for row in tqdm(blocks, desc=desc, unit="block", disable=not progress, leave=False):
            logits, _ = self.forward(row[None], None)
            logits = logits[0, :-1].astype(np.float64)  # (seq - 1, vocab)
            top = logits.max(-1, keepdims=True)
            log_z = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[:, 0]
            total_nll += float((log_z - logits[np.arange(len(row) - 1), row[1:]]).sum())
            count += len(row) - 1
        return math.exp(total_nll / count)


def torch_greedy(model: Any, prompt: Sequence[int], num_tokens: int) -> tuple[list[int], np.ndarray]:
    """The same greedy loop on the transformers model (its own KV cache) -> (tokens, (num_tokens, vocab) logits)."""
    import torch

    tokens, rows = [], []
    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(prompt)]), use_cache=True)
        for _ in range(num_tokens):
            row = out.logits[0, -1].float()  # (vocab,)
            rows.append(row.numpy())
            tokens.append(int(row.argmax()))
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, np.stack(rows)
