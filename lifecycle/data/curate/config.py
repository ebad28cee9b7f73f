"""CurateConfig: every block's settings, one set of defaults, checked when built.

The CLI (`lmforge curate --config curate.yaml`) only overrides these defaults; a YAML file holds one
section per block (`langid:`, `clean:`, ...) with the field names below. Every block has `enabled`;
`__post_init__` names the offending field (`quality.max_symbol_ratio`) in its message.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from lifecycle.errors import ConfigError

# Filler tokens of transcribed dialogue that practitioners strip (repeated Chinese interjections and the
# English hesitation markers); matched as whole words / whole runs, never inside another word.
DEFAULT_FILLERS = ("嗯嗯", "啊啊", "呃呃", "额额", "嗯", "呃", "um", "uh", "erm", "uhm", "umm")
# Lines that are site furniture rather than content (C4 drops similar ones: "javascript", "cookie policy").
DEFAULT_BOILERPLATE = (
    r"(?i)^\s*(all rights reserved|copyright ©|©\s*\d{4})",
    r"(?i)(cookie policy|accept (all )?cookies|we use cookies)",
    r"(?i)^\s*(click here|read more|share this|subscribe( now)?|sign up for our newsletter)\b",
    r"(?i)enable javascript",
    r"^\s*(版权所有|免责声明|点击(这里|此处)|关注我们|扫码关注|分享到)",
)


def _check(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {message}")


def _fraction(value: float, name: str) -> None:
    _check(0.0 <= value <= 1.0, name, f"must be a fraction in [0, 1], got {value!r}")


@dataclass
class LangIdConfig:
    enabled: bool = True
    languages: tuple[str, ...] = ("en", "zh")  # ISO 639-1 codes to keep
    # Candidate languages the detector chooses among; more candidates means fewer false "en" for, say,
    # German text. Documents detected as a candidate outside `languages` are removed as "language_xx".
    candidates: tuple[str, ...] = ("en", "zh", "de", "fr", "es", "ja", "ru", "it", "pt", "nl", "ko", "ar")
    min_confidence: float = 0.5
    # Mixed documents: the dominant language is the one with the most letters (CJK characters count one
    # each, other scripts per letter); a document whose dominant language covers less than this share is
    # removed as "mixed_language".
    min_dominant_share: float = 0.6

    def __post_init__(self) -> None:
        _fraction(self.min_confidence, "langid.min_confidence")
        _fraction(self.min_dominant_share, "langid.min_dominant_share")
        _check(bool(self.languages), "langid.languages", "name at least one language to keep")
        missing = set(self.languages) - set(self.candidates)
        _check(not missing, "langid.languages", f"{sorted(missing)} are not in langid.candidates")


@dataclass
class CleanConfig:
    enabled: bool = True
    strip_html: bool = True
    # NFC, not NFKC: NFKC would turn Chinese full-width punctuation (，：！) into ASCII, changing the text's register.
    unicode_form: str | None = "NFC"  # None: leave as is
    strip_control: bool = True
    boilerplate_patterns: tuple[str, ...] = DEFAULT_BOILERPLATE
    # Dialogue data only: in prose a quoted 「嗯，没错」 is content, so filler removal is off unless asked for.
    remove_fillers: bool = False
    fillers: tuple[str, ...] = DEFAULT_FILLERS
    min_chars_after: int = 1  # a document cleaned down to fewer characters is removed ("empty_after_clean")

    def __post_init__(self) -> None:
        _check(self.unicode_form in (None, "NFC", "NFKC", "NFD", "NFKD"), "clean.unicode_form",
               f"must be NFC, NFKC, NFD, NFKD or null, got {self.unicode_form!r}")
        _check(self.min_chars_after >= 0, "clean.min_chars_after", "must be >= 0")


@dataclass
class QualityConfig:
    enabled: bool = True
    english: tuple[str, ...] = ("gopher_quality", "gopher_repetition", "c4", "fineweb")  # datatrove filters
    # Chinese (and Japanese) rules of our own, on characters (quality_zh.py).
    min_chars: int = 50
    max_chars: int = 1_000_000
    min_cjk_ratio: float = 0.3  # share of CJK ideographs among non-space characters
    max_symbol_ratio: float = 0.2
    min_punct_ratio: float = 0.0  # ordinary prose has ~5-10% punctuation; 0 switches the floor off
    max_punct_ratio: float = 0.35
    max_dup_line_fraction: float = 0.3
    max_dup_para_fraction: float = 0.3
    # Share of characters inside the most frequent n-gram, for n = 2..4 (Gopher 2.2, on characters).
    max_top_ngram_char_fraction: tuple[float, ...] = (0.20, 0.18, 0.16)
    # Share of characters in duplicated n-grams for n = 5..10 (Gopher's ladder, on characters).
    max_dup_ngram_char_fraction: tuple[float, ...] = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)
    banned_words: tuple[str, ...] = ()
    max_banned_words: int = 0  # a document with more occurrences than this is removed

    def __post_init__(self) -> None:
        known = {"gopher_quality", "gopher_repetition", "c4", "fineweb"}
        _check(set(self.english) <= known, "quality.english", f"unknown filters {sorted(set(self.english) - known)}; "
               f"known: {sorted(known)}")
        for name in ("min_cjk_ratio", "max_symbol_ratio", "min_punct_ratio", "max_punct_ratio",
                     "max_dup_line_fraction", "max_dup_para_fraction"):
            _fraction(getattr(self, name), f"quality.{name}")
        _check(0 <= self.min_chars <= self.max_chars, "quality.min_chars", "must be in [0, quality.max_chars]")
        _check(len(self.max_top_ngram_char_fraction) == 3, "quality.max_top_ngram_char_fraction",
               "needs 3 values (n = 2, 3, 4)")
        _check(len(self.max_dup_ngram_char_fraction) == 6, "quality.max_dup_ngram_char_fraction",
               "needs 6 values (n = 5..10)")


@dataclass
class PerplexityConfig:
    enabled: bool = False
    checkpoint: str | None = None  # an lmforge checkpoint (HF-loadable directory)
    low_percentile: float = 5.0  # keep documents whose perplexity lies in [low, high] percentiles
    high_percentile: float = 95.0
    calibration_docs: int = 1000  # the band's edges come from the first documents each worker sees
    max_tokens: int = 512  # a document is scored on its first max_tokens tokens
    batch_size: int = 8

    def __post_init__(self) -> None:
        _check(not self.enabled or self.checkpoint is not None, "perplexity.checkpoint",
               "is required when perplexity.enabled is true")
        _check(0 <= self.low_percentile < self.high_percentile <= 100, "perplexity.low_percentile",
               "needs 0 <= low_percentile < high_percentile <= 100")
        _check(self.calibration_docs >= 10, "perplexity.calibration_docs", "must be >= 10")


@dataclass
class ClassifierConfig:
    enabled: bool = False
    model: str | None = None  # an .npz written by `lmforge curate train-classifier`
    min_score: float = 0.5  # keep documents whose probability of "good" is at least this

    def __post_init__(self) -> None:
        _check(not self.enabled or self.model is not None, "classifier.model",
               "is required when classifier.enabled is true")
        _fraction(self.min_score, "classifier.min_score")


@dataclass
class PiiConfig:
    enabled: bool = True
    types: tuple[str, ...] = ("email", "phone", "cn_id", "bank_card", "ip", "secret")

    def __post_init__(self) -> None:
        known = {"email", "phone", "cn_id", "bank_card", "ip", "secret"}
        _check(set(self.types) <= known, "pii.types", f"unknown types {sorted(set(self.types) - known)}")


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    # Why so small: an edit of a fraction e of the words leaves about (1-e)^n of the n-gram shingles intact, so
    # Jaccard ~ (1-e)^n / (2 - (1-e)^n). At e = 15% (the hardest planted edits) that is 0.57 for n=2
    # but 0.44 for n=3 and 0.27 for n=5 (datatrove's default, made for near-verbatim web copies).
    shingle_size: int = 2  # words (space-separated languages)
    cjk_shingle_size: int = 2  # characters (CJK)
    # LSH: a pair becomes a candidate with probability 1 - (1 - s^rows)^bands: 0.98 at s = 0.45 for 40 x 3.
    bands: int = 40
    rows: int = 3
    # A candidate is a duplicate when the share of agreeing MinHash values (an estimate of the Jaccard
    # similarity of the shingle sets) is at least this.
    threshold: float = 0.45

    def __post_init__(self) -> None:
        _check(self.shingle_size >= 1, "dedup.shingle_size", "must be >= 1")
        _check(self.cjk_shingle_size >= 1, "dedup.cjk_shingle_size", "must be >= 1")
        _check(self.bands >= 1 and self.rows >= 1, "dedup.bands", "bands and rows must be >= 1")
        _fraction(self.threshold, "dedup.threshold")


@dataclass
class DecontamConfig:
    enabled: bool = False
    tasks: tuple[str, ...] = ()  # `lmforge eval` task names or task files
    data_root: str | None = None  # where the tasks' relative data paths point (../shared/data)
    ngram: int = 13  # words; CJK text counts characters (GPT-3 appendix C uses 13-grams)
    cjk_ngram: int = 20

    def __post_init__(self) -> None:
        _check(not self.enabled or bool(self.tasks), "decontam.tasks", "name at least one task when enabled")
        _check(self.ngram >= 3 and self.cjk_ngram >= 3, "decontam.ngram", "must be >= 3")


@dataclass
class MixConfig:
    # Source name -> weight (share of tokens wanted). A document's source is the first input path it was found
    # under. Empty: no mixing, every kept document is written.
    weights: dict[str, float] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        for name, weight in self.weights.items():
            _check(weight > 0, f"mix.weights[{name}]", f"must be > 0, got {weight!r}")


@dataclass
class PackConfig:
    enabled: bool = False
    tokenizer: str | None = None  # a tokenizer directory (`lmforge tokenizer train`)
    seq_len: int = 1024

    def __post_init__(self) -> None:
        _check(not self.enabled or self.tokenizer is not None, "pack.tokenizer", "is required when pack.enabled")
        _check(self.seq_len >= 2, "pack.seq_len", "must be >= 2")


SECTIONS = {"langid": LangIdConfig, "clean": CleanConfig, "quality": QualityConfig,
            "perplexity": PerplexityConfig, "classifier": ClassifierConfig, "pii": PiiConfig,
            "dedup": DedupConfig, "decontam": DecontamConfig, "mix": MixConfig, "pack": PackConfig}


@dataclass
class CurateConfig:
    inputs: tuple[str, ...] = ()
    output_dir: str = "curated"
    text_field: str = "text"
    txt_mode: str = "paragraph"
    workers: int = 1
    # With several workers, an input file larger than its share of the bytes (and than this) is cut into
    # line-aligned byte ranges that workers read in parallel (uncompressed jsonl and line/paragraph txt).
    split_bytes: int = 4 << 20
    # Tasks per stage = input MB / task_mb, rounded up to a multiple of workers: what a task holds at the end of
    # the exact- and MinHash-signature steps (its documents' hashes, sorted in memory) grows with its share of the
    # input, so a corpus larger than RAM is cut into more tasks than workers rather than into bigger ones.
    task_mb: int = 256
    executor: str = "local"  # local | ray
    docs_per_shard: int = 100_000  # output shards hold at most this many documents
    samples_per_reason: int = 5  # removed documents kept per rule for the report
    langid: LangIdConfig = field(default_factory=LangIdConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    pack: PackConfig = field(default_factory=PackConfig)

    def __post_init__(self) -> None:
        _check(self.workers >= 1, "workers", "must be >= 1")
        _check(self.task_mb >= 1, "task_mb", f"must be >= 1 (MB of input per task), got {self.task_mb!r}")
        _check(self.split_bytes >= 1, "split_bytes", f"must be >= 1 (bytes), got {self.split_bytes!r}")
        _check(self.executor in ("local", "ray"), "executor", f"must be local or ray, got {self.executor!r}")
        _check(self.docs_per_shard >= 1, "docs_per_shard", "must be >= 1")
        _check(self.txt_mode in ("line", "paragraph", "file"), "txt_mode", "must be line, paragraph or file")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "<config>") -> CurateConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping of settings, got {type(raw).__name__}")
        top = {f.name for f in fields(cls)}
        if unknown := sorted(set(raw) - top):
            raise ConfigError(f"{where}: unknown keys {', '.join(unknown)}; known: {', '.join(sorted(top))}")
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            if key in SECTIONS:
                kwargs[key] = _section(SECTIONS[key], value, f"{where}: {key}")
            else:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path) -> CurateConfig:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot read the config: {err}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        return cls.from_dict(raw, where=str(path))


def _section(tp: type, raw: Any, where: str) -> Any:
    if isinstance(raw, tp):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    known = {f.name for f in fields(tp)}
    if unknown := sorted(set(raw) - known):
        raise ConfigError(f"{where}: unknown keys {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return tp(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
