"""PII scrubbing: typed placeholders for emails, phones, Chinese resident IDs, bank cards, IPs and secrets.

Each detector is a regular expression plus, where the format has one, a validator that keeps
false positives down: Chinese resident ID numbers carry an ISO 7064 MOD 11-2 check character
(GB 11643-1999), bank cards a Luhn check digit, IPv4 octets must be <= 255. Replacements are
`<EMAIL>`, `<PHONE>`, `<CN_ID>`, `<BANK_CARD>`, `<IP>`, `<SECRET>`; counts per type go to the report.
Detection order matters where formats overlap (an 18-digit ID is also a digit run that looks like a
phone number): IDs and cards are replaced first.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Sequence

from datatrove.data import Document

from lifecycle.data.curate.config import PiiConfig
from lifecycle.data.curate.step import CurateStep, Verdict

PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "cn_id": "<CN_ID>", "bank_card": "<BANK_CARD>",
                "ip": "<IP>", "secret": "<SECRET>"}
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def cn_id_valid(number: str) -> bool:
    """GB 11643-1999: the 18th character is the MOD 11-2 check of the first 17 digits, birth date plausible."""
    if len(number) != 18 or not number[:17].isdigit():
        return False
    month, day = int(number[10:12]), int(number[12:14])
    if not (1 <= month <= 12 and 1 <= day <= 31 and number[6:8] in ("18", "19", "20")):
        return False
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS))
    return _ID_CHECK[total % 11] == number[17].upper()


def luhn_valid(number: str) -> bool:
    digits = [int(d) for d in number if d.isdigit()]
    if not 12 <= len(digits) <= 19:  # Maestro numbers may have 12 digits
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def ip_valid(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


_YEAR = re.compile(r"^(1[5-9]|20)\d\d$")
# a date, possibly followed by a time ("1980-07-28 19:30" would otherwise read as a phone number)
_DATE = re.compile(r"^(?:(?:1[5-9]|20)\d\d[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./](?:1[5-9]|20)\d\d)(?:$|\s)")


def phone_valid(text: str) -> bool:
    """7-15 digits, not a run of years ("1990 2000") nor of small numbers separated by spaces only."""
    digits = sum(ch.isdigit() for ch in text)
    if not 7 <= digits <= 15:
        return False
    if _DATE.match(text):
        return False
    groups = re.split(r"[ .-]+", text.strip("+"))
    if all(_YEAR.match(g) for g in groups if g):
        return False
    has_marker = text.startswith(("+", "00", "(")) or "-" in text or "." in text or "(" in text
    # Space-separated groups without any phone marker: not a number written with thousands separators
    # ("10 000 000": a short first group, then groups of exactly three digits).
    if not has_marker and " " in text:
        digit_groups = [g for g in groups if g.isdigit()]
        if len(digit_groups[0]) < 3 and all(len(g) == 3 for g in digit_groups[1:]):
            return False
    return True


# (type, pattern, validator). Boundaries: (?<![\w.]) / (?![\w]) keep matches from starting or ending inside
# a longer token; digits are matched with \d restricted to ASCII by re.ASCII on the digit-heavy patterns.
DETECTORS: list[tuple[str, re.Pattern, Callable[[str], bool] | None]] = [
    # ASCII-only boundaries: in Chinese text an address sits right against ideographs, which \w also matches
    ("email", re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9-]{1,63}\.)+"
                         r"[A-Za-z]{2,24}(?![A-Za-z0-9-])"),
     None),
    # Known key prefixes (OpenAI, AWS, GitHub, Slack, Google, Hugging Face), or a long token after a key word
    # ("api_key = ..."); for the latter only the value (group 1) is replaced.
    ("secret", re.compile(
        r"\b(?:sk-(?:proj-)?[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36,}|"
        r"xox[abpr]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35}|hf_[A-Za-z0-9]{30,})\b"
        r"|(?i:api[_-]?key|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token|password)[\"']?\s*[:=]\s*[\"']?"
        r"([A-Za-z0-9_\-/+]{16,})"), None),
    ("cn_id", re.compile(r"(?<![\dA-Za-z])\d{17}[\dXx](?![\dA-Za-z])", re.ASCII), cn_id_valid),
    # Contiguous 12-19 digits, or 4-digit groups (Visa/Master/UnionPay print 4-4-4-4(-3)), or Amex 4-6-5.
    ("bank_card", re.compile(r"(?<![\d+.,-])(?:\d{12,19}|\d{4}(?:([ -])\d{4}){2}\1\d{4}(?:\1\d{1,3})?"
                             r"|\d{4}([ -])\d{6}\2\d{4,5})(?![\d-]|[.,]\d)", re.ASCII), luhn_valid),
    ("ip", re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])"
                      r"|(?<![:\w])(?:[0-9A-Fa-f]{1,4}:){2,7}(?::|[0-9A-Fa-f]{1,4})(?![:\w])"
                      r"|(?<![:\w])(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}:){0,5}[0-9A-Fa-f]{1,4}(?![:\w])",
                      re.ASCII), ip_valid),
    ("phone", re.compile(
        # mainland China mobile (1[3-9]x xxxx xxxx, optional +86/0086) and landline (0xx-xxxxxxxx) ...
        r"(?<![\w+])(?:(?:\+|00)86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}(?![\d])"
        r"|(?<![\w+])0\d{2,3}-\d{7,8}(?!\d)"
        # ... then the international and national forms: +cc, (0), (area), groups of 2-4 digits joined by
        # space, dot or dash. The validator wants 7-15 digits (E.164 allows 15) and rejects what reads as
        # years, decimals or a plain number.
        # A dash right after the number may join a label ("555-0134-Office"), so only a following digit blocks.
        r"|(?<![\w+.-])(?<!\d,)(?:(?:\+|00)\d{1,3}[ .-]?)?(?:\(0\)[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,5}"
        r"(?:[ .-]\d{2,8}){1,5}(?:\s?(?:x|ext\.?)\s?\d{1,5})?(?![\w]|-\d|[.,]\d)"
        r"|(?<![\w+.-])(?<!\d,)\+\d{10,14}(?![\w]|-\d|[.,]\d)"
        r"|(?<![\w+.-])(?<!\d,)\d{10,11}(?![\w]|-\d|[.,]\d)", re.ASCII), phone_valid),
]


def find_pii(text: str, types: Sequence[str] = tuple(PLACEHOLDERS)) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, type) spans, earlier detectors winning overlaps, sorted by start."""
    spans: list[tuple[int, int, str]] = []
    taken: list[tuple[int, int]] = []
    for kind, pattern, valid in DETECTORS:
        if kind not in types:
            continue
        for m in pattern.finditer(text):
            start, end = m.span(1) if kind == "secret" and m.group(1) else m.span()
            if valid is not None and not valid(text[start:end]):
                continue
            if any(start < e and s < end for s, e in taken):
                continue
            spans.append((start, end, kind))
            taken.append((start, end))
    return sorted(spans)


def scrub(text: str, types: Sequence[str] = tuple(PLACEHOLDERS)) -> tuple[str, Counter[str]]:
    """(text with typed placeholders, count per type)."""
    spans = find_pii(text, types)
    if not spans:
        return text, Counter()
    out, last, counts = [], 0, Counter()
    for start, end, kind in spans:
        out += [text[last:start], PLACEHOLDERS[kind]]
        last = end
        counts[kind] += 1
    out.append(text[last:])
    return "".join(out), counts


class Pii(CurateStep):
    block = "pii"
    name = "🔒 PII"

    def __init__(self, config: PiiConfig, work_dir: str, samples_per_reason: int = 5) -> None:
        super().__init__(work_dir, samples_per_reason)
        self.config = config

    def process(self, doc: Document) -> Verdict:
        doc.text, counts = scrub(doc.text, self.config.types)
        return Verdict(changes=counts)
