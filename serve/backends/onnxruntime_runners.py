"""The forward passes of OrtEngine: a prompt's prefill, and one decode step of many sequences. Two runners:

    GenaiRunner    onnxruntime-genai: one og.Generator per sequence (its KV cache, its kernels); a decode step
                   runs every sequence's forward separately
    BatchedRunner  plain onnxruntime on the same graph: the prompts of every sequence joining at a step in one
                   forward (left-padded to the longest), then one forward for every running sequence per step,
                   their caches left-padded to a common length (attention_mask zeros the pads, position_ids carry
                   each row's own positions; graph.py's contract)

Call order: prefill([(seq_id, prompt, max_length), ...]) once for the sequences joining at a step, then
decode([(seq_id, last_token), ...]) each step, release(seq_id) when the sequence ends. Both return last-position
logits as float32 numpy rows (num_items, vocab) in the order asked.

When the batch changes (sequences joined or left), BatchedRunner rebuilds its cache once (`_repack`): a copy of
every running row's cache. That is the size of what every decode step already copies (the graph returns the
present cache as a new tensor, the past one with this step's keys concatenated), so it is not worth avoiding
without a graph that updates a preallocated cache in place (`past_present_share_buffer`, a new export).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

RUNNERS = ("batched", "genai")


class GenaiRunner:
    def __init__(self, path: Path, config: dict[str, Any]) -> None:
        from serve.backends.onnxruntime_engine import open_genai_model

        self.model = open_genai_model(path)
        self._generators: dict[str, Any] = {}

    def prefill(self, items: Sequence[tuple[str, Sequence[int], int]]) -> np.ndarray:
        import onnxruntime_genai as og

        rows = []
        for seq_id, prompt_ids, max_length in items:  # one Generator (and KV cache) per sequence
            params = og.GeneratorParams(self.model)
            params.set_search_options(do_sample=False, max_length=max_length)
            generator = self._generators[seq_id] = og.Generator(self.model, params)
            generator.append_tokens(list(prompt_ids))
            rows.append(np.asarray(generator.get_logits())[0, -1])  # (vocab,)
        return np.stack(rows)  # (num_items, vocab)

    def decode(self, items: Sequence[tuple[str, int]]) -> np.ndarray:
        rows = []
        for seq_id, token_id in items:
            generator = self._generators[seq_id]
            generator.append_tokens([token_id])
            rows.append(np.asarray(generator.get_logits())[0, -1])
        return np.stack(rows)  # (num_items, vocab)

    def release(self, seq_id: str) -> None:
        self._generators.pop(seq_id, None)  # frees its KV cache


class BatchedRunner:
    def __init__(self, path: Path, config: dict[str, Any], *, num_threads: int | None = None) -> None:
        from lifecycle.onnx_export.runner import OnnxDecoder

        self.decoder = OnnxDecoder(path / "model.onnx", config, num_threads=num_threads)
        self._pending: dict[str, list[np.ndarray]] = {}  # prefilled, not in the batch yet: (1, kv, len, hd) each
        self._rows: list[str] = []  # batch row -> seq_id
        self._lengths: list[int] = []  # real (unpadded) cache length of each row
        self._past: list[np.ndarray] | None = None  # (rows, kv_heads, padded_len, head_dim) per layer and k/v

    def prefill(self, items: Sequence[tuple[str, Sequence[int], int]]) -> np.ndarray:
        """Every joiner's prompt in one forward, left-padded to the longest; each keeps its unpadded cache."""
        ids, mask, positions = padded_prompts([list(prompt) for _, prompt, _ in items])  # (n, longest) each
        n, longest = ids.shape
        d = self.decoder
        empty = [np.zeros((n, d.kv_heads, 0, d.head_dim), d.cache_dtype)] * (2 * d.num_layers)
        logits, present = d.run(ids, mask, positions, empty)
        for row, (seq_id, prompt, _) in enumerate(items):
            start = longest - len(prompt)
            self._pending[seq_id] = [layer[row:row + 1, :, start:] for layer in present]  # (1, kv, len, hd)
        return logits[:, -1]  # (n, vocab)

    def decode(self, items: Sequence[tuple[str, int]]) -> np.ndarray:
        wanted = [seq_id for seq_id, _ in items]
        if self._pending or set(wanted) != set(self._rows):
            self._repack(wanted)
        order = {seq_id: row for row, seq_id in enumerate(self._rows)}
        tokens = np.zeros((len(self._rows), 1), np.int64)
        for seq_id, token_id in items:
            tokens[order[seq_id], 0] = token_id
        padded = self._past[0].shape[2]
        lengths = np.asarray(self._lengths)
        mask = (np.arange(padded + 1)[None] >= (padded - lengths)[:, None]).astype(np.int64)  # (rows, padded + 1)
        logits, self._past = self.decoder.run(tokens, mask, lengths[:, None].astype(np.int64), self._past)
        self._lengths = [n + 1 for n in self._lengths]
        return logits[[order[seq_id] for seq_id in wanted], -1]  # (num_items, vocab)

    def release(self, seq_id: str) -> None:
        self._pending.pop(seq_id, None)  # a row in the batch leaves at the next repack

    def _repack(self, wanted: list[str]) -> None:
        """Rebuild the batch cache from the rows still wanted and the prefilled newcomers, left-padded anew."""
        padded = self._past[0].shape[2] if self._past is not None else 0
        caches, lengths = [], []
        for seq_id in wanted:
            if seq_id in self._pending:
                cache = self._pending.pop(seq_id)
            else:
                row = self._rows.index(seq_id)
                start = padded - self._lengths[row]
                cache = [layer[row:row + 1, :, start:] for layer in self._past]
            caches.append(cache)
            lengths.append(cache[0].shape[2])
        longest = max(lengths)
        past = []
        for layer in range(len(caches[0])):
            kv_heads, head_dim = caches[0][layer].shape[1], caches[0][layer].shape[3]
            out = np.zeros((len(wanted), kv_heads, longest, head_dim), caches[0][layer].dtype)
            for row, cache in enumerate(caches):
                out[row, :, longest - lengths[row]:] = cache[layer][0]
            past.append(out)
        self._rows, self._lengths, self._past = list(wanted), lengths, past


def padded_prompts(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prompts left-padded to the longest -> input_ids, attention_mask (0 on pads), position_ids (each row's own
    positions from 0; 0 on pads), each (num_prompts, longest) int64."""
    longest = max(map(len, prompts))
    ids = np.zeros((len(prompts), longest), np.int64)
    mask = np.zeros_like(ids)
    positions = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        start = longest - len(prompt)
        ids[row, start:] = prompt
        mask[row, start:] = 1
        positions[row, start:] = np.arange(len(prompt))
    return ids, mask, positions


def make_runner(name: str, path: Path, config: dict[str, Any], *, num_threads: int | None = None):
    """`num_threads`: onnxruntime's intra-op threads for the batched runner (None: its default, one per core)."""
    if name == "genai":
        return GenaiRunner(path, config)
    if name == "batched":
        return BatchedRunner(path, config, num_threads=num_threads)
    raise ValueError(f"runner {name!r}: choose from {', '.join(RUNNERS)}")
