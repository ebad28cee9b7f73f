"""Language identification, offline, with lingua (its n-gram models ship inside the wheel).

datatrove's own LanguageFilter downloads a fastText model at run time, which this project cannot do,
so this block is ours. Each document gets `metadata["language"]` and `metadata["language_score"]`.

Removal reasons: "language_xx" (detected as a candidate we do not keep), "low_confidence" (the best
language's confidence is below `min_confidence`), "mixed_language" (no language covers
`min_dominant_share` of the text), "no_letters" (nothing to detect).

Mixed documents: when a document mixes scripts (say Chinese with English sentences), lingua's
`detect_multiple_languages_of` splits it into runs and each language's share is its share of the
characters; the dominant language labels the document if its share is high enough. Single-script
documents take the cheaper whole-text confidence values.

Memory: lingua loads a language's n-gram models the first time a text needs them, into a cache that lives as
long as the process, and which models a text needs depends on its characters and length: tens of thousands of
English and Chinese documents needed ~9 MB, then one WikiText line with a "½" in it loaded ~180 MB at once
(docs/BENCHMARKS.md, curation memory). Left lazy, every worker would jump by up to the whole model set at some
document of the input. `preload_models` loads all candidates' models (~244 MB for the default twelve) in the main process
before the workers fork, so they share one copy (read-only pages stay shared after fork) and the memory is
there from the start instead of appearing mid-run.
"""

from __future__ import annotations

import re

from datatrove.data import Document

from lifecycle.data.curate.config import LangIdConfig
from lifecycle.data.curate.step import CurateStep, Verdict
from lifecycle.errors import ConfigError

MAX_DETECT_CHARS = 2000  # confidence from the first characters: lingua's cost grows with length
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")
_LETTER = re.compile(r"[^\W\d_]")


def build_detector(candidates: tuple[str, ...], *, preload: bool = False):
    """A lingua detector over `candidates`. `preload` loads every model now (see preload_models)."""
    from lingua import IsoCode639_1, LanguageDetectorBuilder

    codes = []
    for code in candidates:
        iso = getattr(IsoCode639_1, code.upper(), None)
        if iso is None:
            raise ConfigError(f"langid.candidates: {code!r} is not an ISO 639-1 code lingua knows")
        codes.append(iso)
    if len(codes) < 2:
        raise ConfigError("langid.candidates: lingua needs at least two candidate languages")
    builder = LanguageDetectorBuilder.from_iso_codes_639_1(*codes)
    return (builder.with_preloaded_language_models() if preload else builder).build()


def preload_models(candidates: tuple[str, ...]) -> None:
    """Load all of `candidates`' models into this process's lingua cache (process-wide: detectors built later,
    lazily, find them there). Call it in the main process before forking workers, never in a forked child:
    lingua preloads on a rayon thread pool, and a child forked after that pool started has none of its threads,
    so a preload there hangs. Lazy detection in the child uses no pool and reads the inherited models (tested:
    tests/lifecycle/curate/test_langid_memory.py)."""
    build_detector(candidates, preload=True)  # the detector is dropped; the models stay cached
    release_free_heap()


def release_free_heap() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim; a no-op elsewhere). Parsing lingua's model
    files leaves 20-50 MB freed but still resident (measured over fresh processes' preload_models: 258-304 MB
    resident after the load, 218-275 MB after the trim): without it every forked worker starts with that garbage mapped."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        pass


def script_mix(text: str) -> tuple[int, int]:
    """(CJK characters, other letters) in `text`."""
    cjk = len(_CJK.findall(text))
    return cjk, len(_LETTER.findall(text)) - cjk


def language_shares(detector, text: str) -> dict[str, float]:
    """Share of characters per language, from lingua's runs of one language."""
    spans: dict[str, int] = {}
    for result in detector.detect_multiple_languages_of(text):
        code = result.language.iso_code_639_1.name.lower()
        spans[code] = spans.get(code, 0) + (result.end_index - result.start_index)
    total = sum(spans.values()) or 1
    return {code: n / total for code, n in spans.items()}


class LanguageId(CurateStep):
    block = "langid"
    name = "🌐 language id (lingua)"

    def __init__(self, config: LangIdConfig, work_dir: str, samples_per_reason: int = 5) -> None:
        super().__init__(work_dir, samples_per_reason)
        self.config = config
        self._detector = None

    def setup(self) -> None:
        if self._detector is None:
            self._detector = build_detector(self.config.candidates)

    def detect(self, text: str) -> tuple[str | None, float, bool]:
        """(language, confidence, is_mixed) of `text`; language None when there are no letters."""
        head = text[:MAX_DETECT_CHARS]
        cjk, other = script_mix(head)
        letters = cjk + other
        if letters == 0:
            return None, 0.0, False
        if min(cjk, other) >= 0.1 * letters:  # two scripts, each a tenth of the letters or more
            shares = language_shares(self._detector, head)
            if shares:
                language, share = max(shares.items(), key=lambda kv: kv[1])
                return language, share, share < self.config.min_dominant_share
        values = self._detector.compute_language_confidence_values(head)
        best = values[0]
        return best.language.iso_code_639_1.name.lower(), float(best.value), False

    def process(self, doc: Document) -> Verdict:
        language, score, is_mixed = self.detect(doc.text)
        if language is None:
            return Verdict.remove("no_letters")
        doc.metadata["language"] = language
        doc.metadata["language_score"] = round(score, 4)
        tags = (f"detected/{language}",)
        if is_mixed:
            return Verdict.remove("mixed_language", tags)
        if language not in self.config.languages:
            return Verdict.remove(f"language_{language}", tags)
        if score < self.config.min_confidence:
            return Verdict.remove("low_confidence", tags)
        return Verdict(tags=tags)
