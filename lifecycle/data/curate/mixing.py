"""Mixing: weights per source -> the share of each source's documents to keep, and the realized shares.

A weight is the share of tokens a source should have in the output. Without upsampling (repeating
documents is a training-time decision), the largest mixture that honours the weights is set by the
source that is scarcest relative to its weight: scale = min_s tokens_s / w_s, and source s keeps
w_s * scale of its tokens, i.e. a fraction rate_s = w_s * scale / tokens_s of its documents, chosen by
a hash of the document id (deterministic, so a resumed run keeps the same ones). The realized share
is measured on the output and reported next to the target.

Token counts: with a tokenizer (`--tokenizer`, also used to pack), its tokens; without, an
approximation that does not depend on one: whitespace words plus CJK characters (`approx_tokens`).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline

from lifecycle.data.curate.step import CurateStep, Verdict, write_counts
from lifecycle.errors import ConfigError

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")


def approx_tokens(text: str) -> int:
    """Whitespace words of non-CJK text plus one per CJK character."""
    cjk = len(_CJK.findall(text))
    return cjk + len(_CJK.sub(" ", text).split())


class TokenCounter:
    """Counts tokens with a tokenizer directory's tokenizer, or `approx_tokens` without one."""

    def __init__(self, tokenizer: str | None) -> None:
        self.tokenizer_path = tokenizer
        self._tok = None

    def __getstate__(self):
        return {"tokenizer_path": self.tokenizer_path, "_tok": None}

    def count(self, text: str) -> int:
        if self.tokenizer_path is None:
            return approx_tokens(text)
        return len(self.encode(text))

    def encode(self, text: str) -> list[int]:
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.tokenizer_path)
        return self._tok.backend_tokenizer.encode(text, add_special_tokens=False).ids


def mixing_rates(tokens: dict[str, int], weights: dict[str, float]) -> dict[str, float]:
    """source -> fraction of its documents to keep so token shares follow `weights` (see module doc)."""
    if not weights:
        return {source: 1.0 for source in tokens}
    if unknown := sorted(set(weights) - set(tokens)):
        raise ConfigError(f"mix.weights: no documents from {', '.join(unknown)} survived the filters "
                          f"(sources with documents: {', '.join(sorted(tokens)) or 'none'})")
    if unweighted := sorted(set(tokens) - set(weights)):
        raise ConfigError(f"mix.weights: sources {', '.join(unweighted)} have no weight; give every source one "
                          f"(sources: {', '.join(sorted(tokens))})")
    total_weight = sum(weights.values())
    shares = {s: w / total_weight for s, w in weights.items()}
    live = {s: n for s, n in tokens.items() if n > 0}
    if not live:
        return {s: 0.0 for s in tokens}
    scale = min(live[s] / shares[s] for s in live)
    return {s: (min(1.0, shares[s] * scale / live[s]) if s in live else 0.0) for s in tokens}


def keep_by_hash(doc_id: str, rate: float, seed: int) -> bool:
    """Deterministic Bernoulli(rate) from the document id."""
    if rate >= 1.0:
        return True
    digest = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < rate


def document_counts(doc: Document, tokens: TokenCounter) -> Counter[str]:
    """What the manifest sums per document: tokens and documents per source and per language, characters,
    and the length bin of the report's histogram."""
    n = tokens.count(doc.text)
    source, language = doc.metadata.get("source", "?"), doc.metadata.get("language", "?")
    return Counter({"in": 1, "out": 1, f"docs/source/{source}": 1, f"tokens/source/{source}": n,
                    f"docs/language/{language}": 1, f"tokens/language/{language}": n, "tokens": n,
                    "chars": len(doc.text), f"length_log2/{max(len(doc.text), 1).bit_length() - 1}": 1})


class SourceCounter(CurateStep):
    """Counts documents and tokens per source and per language as they pass; removes nothing."""

    name = "🧮 count"

    def __init__(self, block: str, tokens: TokenCounter, work_dir: str | Path) -> None:
        super().__init__(work_dir)
        self.block = block
        self.tokens = tokens

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        counts: Counter[str] = Counter()
        for doc in data:
            counts.update(document_counts(doc, self.tokens))
            yield doc
        write_counts(self.work_dir, self.block, rank, counts)


class Mixer(CurateStep):
    block = "mix"
    name = "🥣 mix"

    def __init__(self, rates: dict[str, float], seed: int, work_dir: str, samples_per_reason: int = 5) -> None:
        super().__init__(work_dir, samples_per_reason)
        self.rates = rates
        self.seed = seed

    def process(self, doc: Document) -> Verdict:
        source = doc.metadata.get("source", "?")
        if keep_by_hash(doc.id, self.rates.get(source, 1.0), self.seed):
            return Verdict()
        return Verdict.remove(f"downsampled_{source}")
