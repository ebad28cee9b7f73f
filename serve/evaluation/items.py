"""Items: a task's records turned into the requests a model answers, with what scoring them needs.

One item, one request (so one item is the unit of concurrency, retry and resume):

- multiple choice -> `LoglikelihoodRequest(context, continuations)`: log P(target_delimiter + choice | prompt)
  for every choice, plus the gold index and the choice texts (acc_norm divides by their length);
- perplexity      -> `RollingRequest(text)`: log P(text), plus its word and byte counts;
- generation      -> `GenerationRequest(prompt, until, max_tokens)` (greedy), plus the references.

A record without a column the task's templates use is refused before anything runs, naming the data
file, the record's line, the column, and the task key (and its line) that wanted it.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from lifecycle.errors import DataError
from serve.evaluation.records import Record
from serve.evaluation.task import TaskSpec


@dataclass(frozen=True)
class LoglikelihoodRequest:
    context: str
    continuations: tuple[str, ...]


@dataclass(frozen=True)
class RollingRequest:
    text: str


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    until: tuple[str, ...]
    max_tokens: int


EvalRequest = LoglikelihoodRequest | RollingRequest | GenerationRequest


@dataclass(frozen=True)
class EvalItem:
    index: int  # position in the task's item list (after --limit)
    where: str  # data file:line
    request: EvalRequest
    gold: int | None = None  # multiple choice: index of the right choice
    choices: tuple[str, ...] = ()  # multiple choice: the choice texts (without the delimiter)
    references: tuple[str, ...] = ()  # generation
    num_words: int = 0  # perplexity
    num_bytes: int = 0  # perplexity
    subject: str | None = None  # the task's `subject` template rendered for this record (not part of key())

    def key(self) -> str:
        """What the item asks and expects: a cached answer is reused only when this is unchanged."""
        payload = json.dumps({"request": asdict(self.request), "type": type(self.request).__name__,
                              "gold": self.gold, "choices": self.choices, "references": self.references},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# -- templates ----------------------------------------------------------------------------------------


def _regex_replace(string: str, pattern: str, repl: str, count: int = 0) -> str:
    return re.sub(pattern, repl, string, count=count)


_ENV: Any = None


def _env() -> Any:
    """Jinja2 as lm-evaluation-harness sets it up (lm_eval/utils.py: StrictUndefined, trailing newline kept,
    `regex_replace`), so the same template renders the same; but sandboxed, because the server renders
    templates its clients send (no attribute access to Python internals, bounded `range`)."""
    global _ENV
    if _ENV is None:
        from jinja2 import BaseLoader, StrictUndefined
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        _ENV = ImmutableSandboxedEnvironment(loader=BaseLoader, undefined=StrictUndefined, keep_trailing_newline=True)
        _ENV.filters["regex_replace"] = _regex_replace
    return _ENV


class Templates:
    """A task's templates, compiled once; `render(key, record)` checks the record has every column first."""

    def __init__(self, spec: TaskSpec) -> None:
        from jinja2 import TemplateSyntaxError, meta

        self.spec = spec
        self._compiled: dict[str, tuple[Any, frozenset[str]]] = {}
        env = _env()
        sources = {"preamble": spec.preamble, "prompt": spec.prompt, "gold": spec.gold, "text": spec.text,
                   "subject": spec.subject}
        if isinstance(spec.choices, tuple):
            sources.update({f"choices[{i}]": t for i, t in enumerate(spec.choices)})
        sources.update({f"references[{i}]": t for i, t in enumerate(spec.references)})
        for key, source in sources.items():
            if source is None:
                continue
            try:
                columns = meta.find_undeclared_variables(env.parse(source)) - set(env.globals)
                self._compiled[key] = (env.from_string(source), frozenset(columns))
            except TemplateSyntaxError as err:
                base = key.split("[")[0]
                raise spec.error(base, f"template error on its line {err.lineno}: {err.message}") from None

    def columns(self, key: str) -> frozenset[str]:
        return self._compiled[key][1]

    def render(self, key: str, record: Record) -> str:
        template, columns = self._compiled[key]
        check_columns(self.spec, key, record, columns)
        try:
            return template.render(**record.fields)
        except Exception as err:  # noqa: BLE001 - a template failing on one record's values (a bad filter arg...)
            raise DataError(f"{record.where}: {self.spec.where(key.split('[')[0])}: {key} failed on this "
                            f"record: {type(err).__name__}: {err}") from None


def check_columns(spec: TaskSpec, key: str, record: Record, columns: frozenset[str] | set[str]) -> None:
    missing = sorted(c for c in columns if c not in record.fields)
    if missing:
        have = ", ".join(c for c in record.fields if c != "_source")
        raise DataError(f"{record.where}: no column {missing[0]!r}, which {key} uses "
                        f"({spec.where(key.split('[')[0])}); this record has columns: {have}")


# -- building items -------------------------------------------------------------------------------------


def _choices(spec: TaskSpec, templates: Templates, record: Record) -> tuple[str, ...]:
    if isinstance(spec.choices, tuple):
        return tuple(templates.render(f"choices[{i}]", record) for i in range(len(spec.choices)))
    check_columns(spec, "choices", record, {spec.choices})
    value = record.fields[spec.choices]
    if isinstance(value, str):  # a list written as text (csv): JSON or a Python literal
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, str) for c in value):
        raise DataError(f"{record.where}: column {spec.choices!r} must hold a non-empty list of strings "
                        f"(choices, {spec.where('choices')}), got {str(value)[:80]!r}")
    return tuple(value)


def _gold(spec: TaskSpec, templates: Templates, record: Record, choices: Sequence[str]) -> int:
    raw = templates.render("gold", record).strip()
    where = f"{record.where}: gold ({spec.where('gold')}) rendered {raw!r}"
    if spec.gold_type == "index":
        try:
            number = float(raw)  # 2, "2" and 2.0 (a JSON number sent through protobuf's Struct) alike
        except ValueError:
            raise DataError(f"{where}: not a choice index (set gold_type: letter or text?)") from None
        gold = int(number) if number.is_integer() else -1
    elif spec.gold_type == "letter":
        gold = ord(raw.upper()) - ord("A") if len(raw) == 1 and raw.isalpha() else -1
    else:
        gold = choices.index(raw) if raw in choices else -1
    if not 0 <= gold < len(choices):
        raise DataError(f"{where}: no such choice among {len(choices)} (gold_type: {spec.gold_type})")
    return gold


def _context(spec: TaskSpec, templates: Templates, record: Record, shots: Sequence[Record]) -> str:
    """lm-eval 0.4's fewshot_context: preamble + (prompt + delimiter + answer + fewshot_delimiter) per shot + prompt."""
    parts = [templates.render("preamble", record)] if spec.preamble else []
    for shot in shots:
        if spec.kind == "multiple_choice":
            choices = _choices(spec, templates, shot)
            answer = choices[_gold(spec, templates, shot, choices)]
        else:
            answer = templates.render("references[0]", shot)
        parts.append(templates.render("prompt", shot) + spec.target_delimiter + answer + spec.fewshot_delimiter)
    return "".join(parts) + templates.render("prompt", record)


def build_items(spec: TaskSpec, records: Sequence[Record], fewshot: Sequence[Record] = (), *,
                limit: int | None = None, joined: Mapping[str, Sequence[str]] | None = None) -> list[EvalItem]:
    """Items for the first `limit` records. `joined`: extra columns by position (the task's join_lines)."""
    templates = Templates(spec)
    if joined:
        for column, values in joined.items():
            if len(values) != len(records):
                raise DataError(f"{spec.where('join_lines')}: join_lines {column}: {len(values)} values for "
                                f"{len(records)} records; the files must line up one to one")
        records = [Record(r.source, r.line, {**r.fields, **{c: v[i] for c, v in joined.items()}})
                   for i, r in enumerate(records)]
    if limit is not None:
        records = records[:limit]
    shots = list(fewshot[:spec.num_fewshot + 1])  # one spare, in case the item itself is among them
    items = []
    for index, record in enumerate(records):
        subject = templates.render("subject", record).strip() if spec.subject else None
        if subject == "":
            raise DataError(f"{record.where}: subject ({spec.where('subject')}) is empty for this record")
        if spec.kind == "multiple_choice":
            choices = _choices(spec, templates, record)
            gold = _gold(spec, templates, record, choices)
            context = _context(spec, templates, record, _shots_for(record, shots, spec.num_fewshot))
            request = LoglikelihoodRequest(context, tuple(spec.target_delimiter + c for c in choices))
            items.append(EvalItem(index, record.where, request, gold=gold, choices=choices, subject=subject))
        elif spec.kind == "perplexity":
            text = templates.render("text", record)
            if not text:
                raise DataError(f"{record.where}: text ({spec.where('text')}) is empty for this record")
            items.append(EvalItem(index, record.where, RollingRequest(text), num_words=count_words(text),
                                  num_bytes=len(text.encode("utf-8")), subject=subject))
        else:
            context = _context(spec, templates, record, _shots_for(record, shots, spec.num_fewshot))
            references = tuple(templates.render(f"references[{i}]", record) for i in range(len(spec.references)))
            request = GenerationRequest(context, spec.until, spec.max_tokens)
            items.append(EvalItem(index, record.where, request, references=references, subject=subject))
    return items


def _shots_for(record: Record, shots: Sequence[Record], num_fewshot: int) -> list[Record]:
    """Never show the model the item it is asked about (few-shot data may be the evaluation file itself)."""
    return [s for s in shots if s.where != record.where][:num_fewshot]


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them for word perplexity (`len(re.split(r"\\s+", doc))`)."""
    return len(re.split(r"\s+", text))
