"""Quality rules for Chinese (and other CJK) text, counted on characters.

Gopher's rules (Rae et al. 2021, appendix A.1.1) count words split on whitespace, which in Chinese
gives one "word" per sentence. These are the same ideas on characters: length in characters,
the share of CJK ideographs, of symbols and of punctuation, duplicated lines and paragraphs (as a
share of characters), and the repetition ladder of Gopher's table A1 computed on character n-grams:
the most frequent 2/3/4-gram may cover at most 20/18/16% of the characters, and duplicated 5..10-grams
at most 15..10%. Each rule is a pure function of the text; `check_cjk` returns the first failed rule.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

import numpy as np

from lifecycle.data.curate.config import QualityConfig

MAX_REPETITION_CHARS = 100_000  # the n-gram ladder looks at this many characters of a long document
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff]")


def _category_counts(text: str) -> tuple[int, int, int, int]:
    """(non-space characters, CJK ideographs/kana, punctuation, symbols)."""
    non_space = cjk = punct = symbol = 0
    for ch in text:
        if ch.isspace():
            continue
        non_space += 1
        cat = unicodedata.category(ch)
        if cat[0] == "P":
            punct += 1
        elif cat[0] == "S":
            symbol += 1
        elif _CJK.match(ch):
            cjk += 1
    return non_space, cjk, punct, symbol


def dup_fraction(parts: list[str]) -> float:
    """Share of characters in parts (lines or paragraphs) that repeat an earlier part."""
    seen: set[str] = set()
    dup = total = 0
    for part in parts:
        part = part.strip()
        if not part:
            continue
        total += len(part)
        if part in seen:
            dup += len(part)
        seen.add(part)
    return dup / total if total else 0.0


def content_chars(text: str) -> str:
    """Letters, digits and ideographs only: the stream the n-gram rules look at."""
    return "".join(ch for ch in text[:MAX_REPETITION_CHARS] if ch.isalnum())


def top_ngram_char_fraction(chars: str, n: int) -> float:
    """Share of characters covered by the most frequent character n-gram (count * n / length)."""
    if len(chars) < n:
        return 0.0
    gram, count = Counter(chars[i:i + n] for i in range(len(chars) - n + 1)).most_common(1)[0]
    return min(1.0, count * len(gram) / len(chars)) if count > 1 else 0.0


def dup_ngram_char_fraction(chars: str, n: int) -> float:
    """Share of characters inside some n-gram that occurs more than once (each character counted once)."""
    if len(chars) < n:
        return 0.0
    grams = [chars[i:i + n] for i in range(len(chars) - n + 1)]
    counts = Counter(grams)
    covered = np.zeros(len(chars), dtype=bool)  # (num_chars,)
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i:i + n] = True
    return float(covered.mean())


def check_cjk(text: str, config: QualityConfig) -> str | None:
    """The first rule `text` fails, or None."""
    non_space, cjk, punct, symbol = _category_counts(text)
    if non_space < config.min_chars:
        return "cjk_too_short"
    if non_space > config.max_chars:
        return "cjk_too_long"
    if cjk / non_space < config.min_cjk_ratio:
        return "cjk_ratio"
    if symbol / non_space > config.max_symbol_ratio:
        return "symbol_ratio"
    if punct / non_space > config.max_punct_ratio:
        return "punct_ratio_high"
    if punct / non_space < config.min_punct_ratio:
        return "punct_ratio_low"
    if dup_fraction(text.split("\n")) > config.max_dup_line_fraction:
        return "dup_lines"
    if dup_fraction(re.split(r"\n\s*\n", text)) > config.max_dup_para_fraction:
        return "dup_paragraphs"
    chars = content_chars(text)
    for n, limit in zip((2, 3, 4), config.max_top_ngram_char_fraction):
        if top_ngram_char_fraction(chars, n) > limit:
            return f"top_{n}gram"
    for n, limit in zip(range(5, 11), config.max_dup_ngram_char_fraction):
        if dup_ngram_char_fraction(chars, n) > limit:
            return f"dup_{n}gram"
    return None


def count_banned(text: str, words: tuple[str, ...]) -> int:
    """Occurrences of banned words: whole words for Latin script, substrings for CJK (no word boundaries)."""
    if not words:
        return 0
    lowered = text.lower()
    total = 0
    for word in words:
        w = word.lower()
        if _CJK.search(w):
            total += lowered.count(w)
        else:
            total += len(re.findall(rf"(?<!\w){re.escape(w)}(?!\w)", lowered))
    return total
