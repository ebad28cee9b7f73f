"""Answers and results: what a target returns for an item's request, the item's metrics, the task's metrics.

Answers are plain dataclasses that round-trip through JSON (the resume cache stores them), so a resumed
run computes exactly what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from serve.evaluation import metrics
from serve.evaluation.items import EvalItem, GenerationRequest, LoglikelihoodRequest, RollingRequest
from serve.evaluation.task import TaskSpec


@dataclass(frozen=True)
class LoglikelihoodAnswer:
    logprobs: tuple[float, ...]  # one per continuation: sum of its tokens' log-probabilities
    is_greedy: tuple[bool, ...]
    num_tokens: tuple[int, ...]


@dataclass(frozen=True)
class RollingAnswer:
    logprob: float
    num_tokens: int


@dataclass(frozen=True)
class GenerationAnswer:
    text: str


Answer = LoglikelihoodAnswer | RollingAnswer | GenerationAnswer
_ANSWER_OF = {LoglikelihoodRequest: LoglikelihoodAnswer, RollingRequest: RollingAnswer,
              GenerationRequest: GenerationAnswer}


def answer_to_json(answer: Answer) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(answer).items()}


def answer_from_json(item: EvalItem, data: dict[str, Any]) -> Answer:
    cls = _ANSWER_OF[type(item.request)]
    if cls is LoglikelihoodAnswer:
        return LoglikelihoodAnswer(tuple(map(float, data["logprobs"])), tuple(map(bool, data["is_greedy"])),
                                   tuple(map(int, data["num_tokens"])))
    if cls is RollingAnswer:
        return RollingAnswer(float(data["logprob"]), int(data["num_tokens"]))
    return GenerationAnswer(str(data["text"]))


@dataclass(frozen=True)
class ItemResult:
    item: EvalItem
    answer: Answer
    metrics: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {"index": self.item.index, "where": self.item.where, "key": self.item.key(),
                "answer": answer_to_json(self.answer), "metrics": self.metrics}


def item_metrics(spec: TaskSpec, item: EvalItem, answer: Answer) -> dict[str, float]:
    """Per-item metrics (pure). Perplexity items keep their sums; the task divides (weighted perplexity)."""
    if isinstance(answer, LoglikelihoodAnswer):
        return metrics.multiple_choice(answer.logprobs, item.choices, item.gold)
    if isinstance(answer, RollingAnswer):
        return {"logprob": answer.logprob, "num_tokens": answer.num_tokens, "num_words": item.num_words,
                "num_bytes": item.num_bytes}
    out: dict[str, float] = {}
    if "exact_match" in spec.metrics:
        norm = dict(regexes_to_ignore=spec.regexes_to_ignore, ignore_case=spec.ignore_case,
                    ignore_punctuation=spec.ignore_punctuation)
        if not spec.extract:
            out["exact_match"] = metrics.exact_match(answer.text, item.references, **norm)
        for name, extractor in spec.extract.items():
            out[f"exact_match/{name}"] = metrics.exact_match(metrics.extract(answer.text, extractor),
                                                             item.references, **norm)
    if "rouge" in spec.metrics:
        out.update(metrics.rouge(answer.text, item.references))
    return out


def subject_metrics(spec: TaskSpec, results: Sequence[ItemResult]) -> dict[str, dict[str, float]]:
    """Per subject (the task's `subject` template; {} without one), sorted by name: its number of items and
    the task's metrics over its items alone. The task's own metrics stay pooled over all items (lm-eval's
    MMLU group score, weighted by subject size, is the same number)."""
    if spec.subject is None:
        return {}
    groups: dict[str, list[ItemResult]] = {}
    for result in results:
        groups.setdefault(result.item.subject or "", []).append(result)
    return {name: {"num_items": len(group), **task_metrics(spec, group)} for name, group in sorted(groups.items())}


def task_metrics(spec: TaskSpec, results: Sequence[ItemResult]) -> dict[str, float]:
    """The task's metrics over its items (in item order, whatever order they finished in)."""
    results = sorted(results, key=lambda r: r.item.index)
    if not results:
        return {}
    if spec.kind == "perplexity":
        sums = {k: sum(r.metrics[k] for r in results) for k in ("logprob", "num_tokens", "num_words", "num_bytes")}
        out = metrics.perplexities(sums["logprob"], int(sums["num_tokens"]), int(sums["num_words"]),
                                   int(sums["num_bytes"]))
        out.update(num_tokens=sums["num_tokens"], num_words=sums["num_words"], num_bytes=sums["num_bytes"])
        return out
    out = metrics.mean_metrics([r.metrics for r in results])
    if spec.kind == "generation" and "bleu" in spec.metrics:
        out["bleu"] = metrics.corpus_bleu([r.answer.text for r in results], [r.item.references for r in results])
    return out
