"""Rule-based quality: datatrove's Gopher / C4 / FineWeb filters for English, our CJK rules for Chinese.

The language comes from the langid block (`metadata["language"]`; without it the script decides:
mostly CJK characters -> "zh"). English documents go through datatrove's stock filters in order,
each removal reason prefixed with the filter's name ("gopher_quality/gopher_below_avg_threshold");
C4's filter also edits the text (drops lines without terminal punctuation, citations), which is
counted as a change. Chinese and Japanese documents go through quality_zh.check_cjk. Other languages
get only the banned-word rule, which applies to every document.

Speed: datatrove's English filters each tokenize the document with its shared spaCy `blank("en")`
tokenizer, inside a spaCy memory zone, so every word's lexeme and every token split is built and thrown
away again for every document and every filter: most of the pipeline's time (profile in
docs/BENCHMARKS.md). `SpacyWarmUp` tokenizes the first English documents once more *outside* a zone, so
their words stay in the vocabulary and tokenizer cache; later tokenizations of those words are lookups
(~6x faster). The tokens are the same either way (tests/lifecycle/curate/test_blocks_text.py checks);
the warm-up stops after `WARM_UP_CHARS` characters, which bounds the memory it adds.
"""

from __future__ import annotations

from collections import Counter

from datatrove.data import Document

from lifecycle.data.curate.config import QualityConfig
from lifecycle.data.curate.langid import script_mix
from lifecycle.data.curate.quality_zh import check_cjk, count_banned
from lifecycle.data.curate.step import CurateStep, Verdict

CJK_LANGUAGES = ("zh", "ja", "ko")
# ~2.5 MB of WikiText-2 holds ~33k distinct words; 4M characters of English keep the most frequent words of
# any corpus (Zipf) and add at most a few tens of MB to each worker (docs/BENCHMARKS.md, memory).
WARM_UP_CHARS = 4_000_000


def english_filters(names: tuple[str, ...]) -> list[tuple[str, object]]:
    """datatrove's stock filters, by name, with their published defaults."""
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter)

    factories = {"gopher_quality": GopherQualityFilter, "gopher_repetition": GopherRepetitionFilter,
                 "c4": C4QualityFilter, "fineweb": FineWebQualityFilter}
    return [(name, factories[name]()) for name in names]


def guess_language(doc: Document) -> str:
    language = doc.metadata.get("language")
    if language:
        return language
    cjk, other = script_mix(doc.text[:2000])
    return "zh" if cjk > other else "en"


class SpacyWarmUp:
    """Keeps the words of the first `budget` characters of English in datatrove's spaCy tokenizer for good."""

    def __init__(self, languages: set[str], budget: int = WARM_UP_CHARS) -> None:
        self.languages, self.budget, self.done = sorted(languages), budget, 0

    def __call__(self, text: str) -> None:
        if self.done >= self.budget:
            return
        from datatrove.utils.word_tokenizers import SpaCyTokenizer, load_word_tokenizer

        for language in self.languages:
            tok = load_word_tokenizer(language)  # the instance the filters use (datatrove caches one per language)
            if isinstance(tok, SpaCyTokenizer):
                tok.tokenizer.tokenizer(text)  # the tokenizer alone (no max_length, no sentencizer), outside a zone
        self.done += len(text)


class Quality(CurateStep):
    block = "quality"
    name = "🥇 quality rules (datatrove Gopher/C4/FineWeb + CJK)"

    def __init__(self, config: QualityConfig, work_dir: str, samples_per_reason: int = 5) -> None:
        super().__init__(work_dir, samples_per_reason)
        self.config = config
        self._english = None
        self._warm_up = None

    def setup(self) -> None:
        if self._english is None:
            self._english = english_filters(self.config.english)
            self._warm_up = SpacyWarmUp({getattr(stock, "language", "en") for _, stock in self._english})

    def process(self, doc: Document) -> Verdict:
        c = self.config
        if c.banned_words and count_banned(doc.text, c.banned_words) > c.max_banned_words:
            return Verdict.remove("banned_words")
        language = guess_language(doc)
        if language in CJK_LANGUAGES:
            reason = check_cjk(doc.text, c)
            return Verdict.remove(f"cjk/{reason}") if reason else Verdict()
        if language != "en":
            return Verdict()
        changes: Counter[str] = Counter()
        if self._english:
            self._warm_up(doc.text)
        for name, stock in self._english:
            before = doc.text
            result = stock.filter(doc)
            keep, reason = result if isinstance(result, tuple) else (result, None)
            if not keep:
                doc.text = before  # the sample shows the document as this block received it
                return Verdict.remove(f"{name}/{reason or 'rejected'}")
            if doc.text != before:
                changes[f"{name}_edited"] += 1
        if not doc.text.strip():
            return Verdict.remove("empty_after_quality")
        return Verdict(changes=changes)
