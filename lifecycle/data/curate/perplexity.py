"""Perplexity band filter: score each document with a small checkpoint of ours, keep a percentile band.

CCNet (Wenzek et al. 2020, section 3.3) scores documents with a language model trained on clean
text and splits by perplexity percentiles: very low perplexity is often boilerplate or repeated
text, very high is noise. Percentiles need a distribution, and a stream has none up front: each
worker buffers its first `calibration_docs` documents, takes the band's edges from their
perplexities, then releases them and filters the rest of its stream with the same edges (memory:
calibration_docs documents). The edges are recorded in the block's counts.

Perplexity = exp(mean negative log-likelihood per token) over the first `max_tokens` tokens, with
the checkpoint's own tokenizer, batched with right padding and an attention mask.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
from datatrove.data import Document, DocumentsPipeline

from lifecycle.data.curate.config import PerplexityConfig
from lifecycle.data.curate.step import SAMPLE_CHARS, CurateStep


def band_edges(perplexities: Sequence[float], low_pct: float, high_pct: float) -> tuple[float, float]:
    values = np.asarray([p for p in perplexities if math.isfinite(p)], dtype=np.float64)
    if values.size == 0:
        return 0.0, math.inf
    return float(np.percentile(values, low_pct)), float(np.percentile(values, high_pct))


class PerplexityScorer:
    """Batched perplexity with a causal LM checkpoint (transformers)."""

    def __init__(self, checkpoint: str, max_tokens: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lifecycle.checkpoint import load_checkpoint

        ckpt = load_checkpoint(checkpoint)  # verifies the files against the manifest's sha256
        self.tokenizer = AutoTokenizer.from_pretrained(ckpt.path)
        self.model = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=torch.float32).eval()
        limit = getattr(self.model.config, "max_position_embeddings", max_tokens) or max_tokens
        self.max_tokens = min(max_tokens, limit)
        self.torch = torch

    def __call__(self, texts: Sequence[str]) -> list[float]:
        torch = self.torch
        ids = [self.tokenizer.backend_tokenizer.encode(t, add_special_tokens=False).ids[: self.max_tokens]
               for t in texts]
        width = max((len(i) for i in ids), default=0)
        if width < 2:
            return [math.inf] * len(texts)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)  # (batch, width)
        mask = torch.zeros((len(ids), width), dtype=torch.long)  # (batch, width)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits.float()  # (batch, width, vocab)
        logp = torch.log_softmax(logits[:, :-1], dim=-1)  # (batch, width-1, vocab): predicts tokens 1..
        target = input_ids[:, 1:]  # (batch, width-1)
        nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (batch, width-1)
        valid = mask[:, 1:].float()  # (batch, width-1)
        counts = valid.sum(dim=1)
        mean = (nll * valid).sum(dim=1) / counts.clamp(min=1)
        return [math.exp(m) if c > 0 else math.inf for m, c in zip(mean.tolist(), counts.tolist())]


class PerplexityFilter(CurateStep):
    block = "perplexity"
    name = "📉 perplexity band"

    def __init__(self, config: PerplexityConfig, work_dir: str, samples_per_reason: int = 5) -> None:
        super().__init__(work_dir, samples_per_reason)
        self.config = config

    def _score(self, scorer: PerplexityScorer, docs: list[Document]) -> list[float]:
        size = self.config.batch_size
        return [p for start in range(0, len(docs), size) for p in scorer([d.text for d in docs[start:start + size]])]

    def _decide(self, docs: list[Document], scores: list[float], edges: tuple[float, float],
                counts: Counter[str], samples: list[dict]) -> DocumentsPipeline:
        for doc, ppl in zip(docs, scores):
            finite = math.isfinite(ppl)
            doc.metadata["perplexity"] = round(ppl, 3) if finite else None
            counts["in"] += 1
            reason = ("too_short" if not finite else "low_perplexity" if ppl < edges[0]
                      else "high_perplexity" if ppl > edges[1] else None)
            if reason is None:
                counts["out"] += 1
                yield doc
                continue
            counts[f"removed/{reason}"] += 1
            if sum(s["reason"] == reason for s in samples) < self.samples_per_reason:
                samples.append({"block": self.block, "reason": reason, "id": doc.id,
                                "text": f"[perplexity {doc.metadata['perplexity']}] " + doc.text[:SAMPLE_CHARS],
                                "num_chars": len(doc.text)})

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        c = self.config
        scorer = PerplexityScorer(c.checkpoint, c.max_tokens)
        counts: Counter[str] = Counter()
        samples: list[dict] = []
        edges: tuple[float, float] | None = None
        buffer: list[Document] = []
        for doc in data:
            buffer.append(doc)
            if edges is None and len(buffer) >= c.calibration_docs:
                scores = self._score(scorer, buffer)
                edges = band_edges(scores, c.low_percentile, c.high_percentile)
            elif edges is not None and len(buffer) >= c.batch_size:
                scores = self._score(scorer, buffer)
            else:
                continue
            yield from self._decide(buffer, scores, edges, counts, samples)
            buffer = []
        if buffer:  # the tail; or, with fewer documents than calibration_docs, calibrate on all of them
            scores = self._score(scorer, buffer)
            edges = edges or band_edges(scores, c.low_percentile, c.high_percentile)
            yield from self._decide(buffer, scores, edges, counts, samples)
        if edges is not None:
            counts["band_low_perplexity_x1000"] = int(edges[0] * 1000)
            counts["band_high_perplexity_x1000"] = int(min(edges[1], 1e12) * 1000)
        self.finish(rank, counts, samples)
