"""Cleaning: markup, Unicode form, control characters, boilerplate lines, dialogue fillers.

Each transformation is a pure function of the text (tested alone); the block applies the enabled ones
in order and counts, per document, which ones changed something ("html", "unicode", "control",
"boilerplate_lines", "fillers"). A document cleaned down to fewer than `min_chars_after`
characters is removed as "empty_after_clean".
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

from datatrove.data import Document

from lifecycle.data.curate.config import CleanConfig
from lifecycle.data.curate.step import CurateStep, Verdict

# Elements whose content is never prose.
_SCRIPT = re.compile(r"<(script|style|noscript|template)\b[^>]*>.*?</\1\s*>", re.I | re.S)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_BLOCK_TAG = re.compile(r"</?(p|div|br|li|ul|ol|h[1-6]|tr|table|section|article|header|footer|pre|blockquote)\b[^>]*>",
                        re.I)
# Only real HTML element names: "<unk>" (WikiText) or "a <b and c> d" in prose are not markup.
_TAG_NAMES = ("a|abbr|address|area|article|aside|audio|b|base|bdi|bdo|blockquote|body|br|button|canvas|caption|cite|"
              "code|col|colgroup|data|dd|del|details|dfn|dialog|div|dl|dt|em|embed|fieldset|figcaption|figure|font|"
              "footer|form|h[1-6]|head|header|hr|html|i|iframe|img|input|ins|kbd|label|legend|li|link|main|map|mark|"
              "meta|nav|noscript|object|ol|optgroup|option|output|p|param|picture|pre|q|s|samp|script|section|"
              "select|small|source|span|strong|style|sub|summary|sup|svg|table|tbody|td|template|textarea|tfoot|th|"
              "thead|time|title|tr|track|u|ul|var|video|wbr|center")
_TAG = re.compile(rf"</?(?:{_TAG_NAMES})(?:\s+[^<>]*?)?/?>", re.I)
_HAS_MARKUP = re.compile(rf"</?(?:{_TAG_NAMES})(?:\s[^<>]*)?/?>|<!--|&(#\d+|#x[0-9a-fA-F]+|[a-zA-Z]+);", re.I)
# C0/C1 controls except tab and newline, plus zero-width and bidi controls that render as nothing.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_CJK_CHAR = r"\u3400-\u4dbf\u4e00-\u9fff"


def strip_html(text: str) -> str:
    """Remove tags, scripts/styles and comments; block tags become line breaks; entities are decoded."""
    if not _HAS_MARKUP.search(text):
        return text
    text = _COMMENT.sub("", _SCRIPT.sub("", text))
    text = _BLOCK_TAG.sub("\n", text)
    text = html.unescape(_TAG.sub("", text))
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def normalize_unicode(text: str, form: str) -> str:
    return unicodedata.normalize(form, text)


def strip_control(text: str) -> str:
    return _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


def drop_boilerplate_lines(text: str, patterns: Sequence[str]) -> tuple[str, int]:
    """(text without lines matching any pattern, number of lines dropped)."""
    compiled = _compile(tuple(patterns))
    lines = text.split("\n")
    kept = [line for line in lines if not any(p.search(line) for p in compiled)]
    return "\n".join(kept), len(lines) - len(kept)


@lru_cache(maxsize=16)
def _compile(patterns: tuple[str, ...]) -> tuple[re.Pattern, ...]:
    return tuple(re.compile(p) for p in patterns)


@lru_cache(maxsize=16)
def _filler_pattern(fillers: tuple[str, ...]) -> re.Pattern | None:
    """Latin fillers as whole words; CJK fillers as whole runs of themselves (嗯嗯 but not 嗯 inside 嗯哼)."""
    latin = [re.escape(f) for f in fillers if not re.search(f"[{_CJK_CHAR}]", f)]
    # a CJK filler made of one repeated character (嗯嗯) matches any longer run of it too (嗯嗯嗯)
    cjk = [f"{re.escape(f[0])}{{{len(f)},}}" if len(set(f)) == 1 else re.escape(f)
           for f in sorted((f for f in fillers if re.search(f"[{_CJK_CHAR}]", f)), key=len, reverse=True)]
    parts = []
    if latin:
        # optional trailing comma/ellipsis so "um, I think" becomes "I think"
        parts.append(r"(?<![\w'])(?:" + "|".join(latin) + r")(?![\w'])[,，.…]*\s*")
    if cjk:
        parts.append(r"(?:" + "|".join(cjk) + r")[，,。…～~]*")
    return re.compile("|".join(parts), re.I) if parts else None


def remove_fillers(text: str, fillers: Sequence[str]) -> tuple[str, int]:
    """(text without filler tokens, number removed). Whitespace left behind is collapsed."""
    pattern = _filler_pattern(tuple(fillers))
    if pattern is None:
        return text, 0
    out, n = pattern.subn("", text)
    if n:
        out = re.sub(r"[ \t]{2,}", " ", out)
        out = re.sub(r"^[ \t]+", "", out, flags=re.M)
    return out, n


class Clean(CurateStep):
    block = "clean"
    name = "🧽 clean"

    def __init__(self, config: CleanConfig, work_dir: str, samples_per_reason: int = 5) -> None:
        super().__init__(work_dir, samples_per_reason)
        self.config = config

    def clean(self, text: str) -> tuple[str, Counter[str]]:
        c = self.config
        changes: Counter[str] = Counter()

        def step(name: str, new: str, count: int = 1) -> str:
            if new != text_box[0]:
                changes[name] += count
            text_box[0] = new
            return new

        text_box = [text]
        if c.strip_html:
            step("html", strip_html(text_box[0]))
        if c.unicode_form:
            step("unicode", normalize_unicode(text_box[0], c.unicode_form))
        if c.strip_control:
            step("control", strip_control(text_box[0]))
        if c.boilerplate_patterns:
            new, n = drop_boilerplate_lines(text_box[0], c.boilerplate_patterns)
            step("boilerplate_lines", new, n)
        if c.remove_fillers and c.fillers:
            new, n = remove_fillers(text_box[0], c.fillers)
            step("fillers", new, n)
        return text_box[0].strip(), changes

    def process(self, doc: Document) -> Verdict:
        text, changes = self.clean(doc.text)
        if len(text) < max(self.config.min_chars_after, 1):
            return Verdict.remove("empty_after_clean")
        doc.text = text
        return Verdict(changes=changes)
