"""transformers `generate` as a peer, in lmforge's own environment: W1 as one padded static batch, W2 one stream."""

from __future__ import annotations

import time
from typing import Any

import torch

from serve.bench_peers.runner_io import stream_stats, throughput_stats


def hf_w1(model, prompts: list[list[int]], output_len: int, pad_id: int) -> dict[str, Any]:
    """A padded static batch through `generate` (all prompts are the same length here: no waste)."""
    ids = torch.tensor(prompts)  # (num_requests, prompt_len)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                             min_new_tokens=output_len, do_sample=False, pad_token_id=pad_id)
    elapsed = time.perf_counter() - start
    token_ids = out[:, ids.shape[1]:].tolist()  # (num_requests, output_len)
    return throughput_stats(elapsed, token_ids) | {"token_ids": token_ids}


def hf_stream(model, prompt: list[int], output_len: int, pad_id: int) -> dict[str, Any]:
    """One stream; a token's time is when its logits reach the processors (just before it is picked)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    ids = torch.tensor([prompt])  # (1, prompt_len)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                             min_new_tokens=output_len, do_sample=False, pad_token_id=pad_id,
                             logits_processor=LogitsProcessorList([Stamp()]))
    return stream_stats(start, stamps) | {"token_ids": out[:, ids.shape[1]:].tolist()}
