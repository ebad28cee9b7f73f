"""Scorers: pure functions from a model's answers to per-item and per-task metrics.

Definitions follow lm-evaluation-harness 0.4 (lm_eval/api/task.py `process_results`, lm_eval/api/metrics.py),
so numbers are comparable with it:

- acc = [argmax_i ll_i == gold]; acc_norm = [argmax_i ll_i / len(choice_i) == gold], with len in characters
  of the choice text without the target delimiter; argmax takes the first of equal values (numpy's).
- perplexity over a task is weighted: exp(-sum(ll) / sum(units)) with units = tokens, words
  (`re.split(r"\\s+")`) or UTF-8 bytes; bits_per_byte = -sum(ll) / sum(bytes) / ln 2.
- exact_match: after `regexes_to_ignore` (removed from prediction and reference alike), optional lower-casing
  and punctuation removal, the strings are equal.
- BLEU: sacrebleu's corpus BLEU (0-100) against every reference; ROUGE: rouge-score's F-measure of
  rouge1/rouge2/rougeL (0-1), the best over the references, averaged over items.
- stderr of a mean: sample standard deviation / sqrt(n) (lm-eval's `mean_stderr`).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

from serve.evaluation.task import Extractor


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (numpy.argmax)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def multiple_choice(logprobs: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    if len(logprobs) != len(choices):
        raise ValueError(f"{len(logprobs)} log-likelihoods for {len(choices)} choices")
    pred = argmax(logprobs)
    # An empty choice text has length 0: lm-eval divides by it too (numpy gives ±inf or nan); keep numbers finite.
    pred_norm = argmax([ll / max(len(c), 1) for ll, c in zip(logprobs, choices)])
    return {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold)}


def perplexities(logprob_sum: float, num_tokens: int, num_words: int, num_bytes: int) -> dict[str, float]:
    """Weighted perplexities of a whole task from its summed log-likelihood and unit counts."""
    nll = -logprob_sum
    return {"token_perplexity": math.exp(nll / num_tokens) if num_tokens else math.nan,
            "word_perplexity": math.exp(nll / num_words) if num_words else math.nan,
            "byte_perplexity": math.exp(nll / num_bytes) if num_bytes else math.nan,
            "bits_per_byte": nll / num_bytes / math.log(2) if num_bytes else math.nan}


def extract(text: str, extractor: Extractor) -> str:
    """lm-eval's regex filter: all matches, pick `select`; of a match with groups, the first non-empty one."""
    matches = re.findall(extractor.regex, text)
    if not matches:
        return extractor.fallback
    try:
        match = matches[extractor.select]
    except IndexError:
        return extractor.fallback
    if isinstance(match, tuple):
        match = next((m for m in match if m), None)
        if match is None:
            return extractor.fallback
    return match.strip()


def normalize(text: str, *, regexes_to_ignore: Sequence[str] = (), ignore_case: bool = False,
              ignore_punctuation: bool = False) -> str:
    for pattern in regexes_to_ignore:
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    return text


def exact_match(prediction: str, references: Sequence[str], **normalize_kwargs: Any) -> float:
    """1.0 when the normalized prediction equals the normalized first reference (lm-eval scores against one)."""
    return float(normalize(prediction, **normalize_kwargs) == normalize(references[0], **normalize_kwargs))


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu corpus BLEU; items may have different numbers of references (missing ones are padded
    with the item's first reference, which changes nothing for BLEU's max-count clipping)."""
    try:
        import sacrebleu
    except ImportError as err:
        raise ImportError("BLEU needs sacrebleu: pip install 'lmforge[eval]'") from err
    num_refs = max(len(r) for r in references)
    streams = [[refs[k] if k < len(refs) else refs[0] for refs in references] for k in range(num_refs)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


_ROUGE_SCORER: Any = None
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(prediction: str, references: Sequence[str]) -> dict[str, float]:
    """rouge-score F-measures (stemming on), the best over the references."""
    global _ROUGE_SCORER
    if _ROUGE_SCORER is None:
        try:
            from rouge_score import rouge_scorer
        except ImportError as err:
            raise ImportError("ROUGE needs rouge-score: pip install 'lmforge[eval]'") from err
        _ROUGE_SCORER = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    best = dict.fromkeys(ROUGE_TYPES, 0.0)
    for reference in references:
        scores = _ROUGE_SCORER.score(reference, prediction)
        for name in ROUGE_TYPES:
            best[name] = max(best[name], scores[name].fmeasure)
    return best


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mu = sum(values) / n
    if n == 1:
        return mu, math.nan
    return mu, math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def mean_metrics(per_item: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Every per-item metric averaged, with `<name>_stderr` beside it."""
    out: dict[str, float] = {}
    for name in per_item[0] if per_item else ():
        mu, se = mean_and_stderr([m[name] for m in per_item])
        out[name], out[f"{name}_stderr"] = mu, se
    return out
