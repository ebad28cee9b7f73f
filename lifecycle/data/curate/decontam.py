"""Decontamination: drop training documents that share a long n-gram with an evaluation set.

GPT-3 (Brown et al. 2020, appendix C) removed training documents sharing a 13-gram with a benchmark;
we do the same against the tasks of `lmforge eval` (serve/evaluation/tasks/*.yaml or a task file),
reading their items exactly as `lmforge eval` does (same data files, same prompt templates): every
prompt, choice and reference becomes n-grams. Text is simplified first (lower case, punctuation
removed: datatrove's simplify_text). Word n-grams (`ngram`, default 13) for space-separated text;
for CJK runs character n-grams (`cjk_ngram`, default 20), since a 13-word window of Chinese is a
whole paragraph. The eval n-grams are held as 64-bit hashes in a set, per worker.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator
from pathlib import Path

from datatrove.data import Document
from datatrove.utils.text import TextNormConfig, simplify_text

from lifecycle.data.curate.config import DecontamConfig
from lifecycle.data.curate.step import CurateStep, Verdict

_CJK_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\u3040-\u30ff]+")


def _h(gram: str) -> int:
    b = gram.encode("utf-8")
    return (zlib.crc32(b) << 32) | zlib.adler32(b)


def ngram_hashes(text: str, n: int, cjk_n: int) -> Iterator[int]:
    simple = simplify_text(text, TextNormConfig())
    words = _CJK_RUN.sub(" ", simple).split()
    for i in range(len(words) - n + 1):
        yield _h(" ".join(words[i:i + n]))
    for run in _CJK_RUN.findall(simple.replace(" ", "")):
        for i in range(len(run) - cjk_n + 1):
            yield _h(run[i:i + cjk_n])


def item_texts(item) -> list[str]:
    """Every text of an `lmforge eval` item: prompt/context, continuations or choices, references."""
    request = item.request
    texts = [v for v in vars(request).values() if isinstance(v, str)]
    for v in vars(request).values():
        if isinstance(v, tuple):
            texts += [x for x in v if isinstance(x, str)]
    texts += list(item.choices) + list(item.references)
    # the context with each answer: a training document may quote a question with its answer
    if hasattr(request, "context"):
        texts += [request.context + c for c in getattr(request, "continuations", ())]
    return texts


def eval_ngrams(config: DecontamConfig) -> dict[int, str]:
    """n-gram hash -> the task it came from."""
    from serve.evaluation.data_root import DataRoot
    from serve.evaluation.dataset import load_items
    from serve.evaluation.task import load_task

    table: dict[int, str] = {}
    for name in config.tasks:
        spec = load_task(name)
        root = DataRoot(config.data_root, fallback=Path(spec.source).parent)  # as `lmforge eval` resolves them
        for item in load_items(spec, root):
            for text in item_texts(item):
                for h in ngram_hashes(text, config.ngram, config.cjk_ngram):
                    table.setdefault(h, spec.name)
    return table


class Decontaminate(CurateStep):
    block = "decontam"
    name = "🧫 decontamination"

    def __init__(self, config: DecontamConfig, work_dir: str, samples_per_reason: int = 5) -> None:
        super().__init__(work_dir, samples_per_reason)
        self.config = config
        self._table: dict[int, str] | None = None

    def setup(self) -> None:
        if self._table is None:
            self._table = eval_ngrams(self.config)

    def process(self, doc: Document) -> Verdict:
        for h in ngram_hashes(doc.text, self.config.ngram, self.config.cjk_ngram):
            task = self._table.get(h)
            if task is not None:
                return Verdict.remove(f"overlaps_{task}")
        return Verdict()
