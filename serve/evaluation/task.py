"""TaskSpec: one evaluation task, declared in a small YAML or JSON file over local data.

    name: arc_easy
    kind: multiple_choice              # multiple_choice | perplexity | generation
    data: eval/llm-foundry/arc_easy.jsonl   # relative to --data-root (or to this file's folder); globs allowed
    prompt: "{{query}}\\nAnswer:"      # Jinja2, as lm-evaluation-harness's doc_to_text
    choices: choices                   # a column holding a list, or a list of templates ["{{sol1}}", "{{sol2}}"]
    gold: "{{gold}}"                   # index (gold_type: index), "B" (letter) or the right choice's text (text)
    subject: "{{ _source }}"           # optional: per-subject metrics as well (`_source`: the data file's stem)

Templates are Jinja2 with lm-evaluation-harness's settings (StrictUndefined, trailing newline kept, a
`regex_replace` filter), so a task's prompt can be pasted into an lm-eval task YAML unchanged and both
build the same strings. The prompt is built as lm-eval 0.4 does: `preamble`, then `num_fewshot` solved
examples (prompt + target_delimiter + answer + fewshot_delimiter), then the prompt; each choice is scored
as `target_delimiter + choice`.

Errors name the task file, the line of the offending key, and the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lifecycle.errors import ConfigError

KINDS = ("multiple_choice", "perplexity", "generation")
GOLD_TYPES = ("index", "letter", "text")
GENERATION_METRICS = ("exact_match", "bleu", "rouge")
BUILTIN_DIR = Path(__file__).resolve().parent / "tasks"


@dataclass(frozen=True)
class Extractor:
    """Pull the answer out of generated text: the `select` match of `regex` (its first non-empty group, as
    lm-eval's regex filter), or `fallback` when nothing matches."""

    regex: str
    select: int = 0  # 0: first match, -1: last
    fallback: str = "[invalid]"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    data: tuple[str, ...]
    # reading the data (serve/evaluation/records.py)
    format: str | None = None
    txt_split: str = "paragraph"
    txt_split_regex: str | None = None
    lines_fields: tuple[str, ...] = ()
    csv_delimiter: str = ","
    join_lines: dict[str, str] = field(default_factory=dict)  # column -> side file, one value per line
    # prompts
    preamble: str = ""  # template before the few-shot examples (lm-eval's `description`)
    prompt: str | None = None
    target_delimiter: str = " "
    num_fewshot: int = 0
    fewshot_data: tuple[str, ...] = ()  # the first num_fewshot records of these (lm-eval's first_n sampler)
    fewshot_delimiter: str = "\n\n"
    # multiple choice
    choices: str | tuple[str, ...] | None = None
    gold: str | None = None
    gold_type: str = "index"
    # perplexity
    text: str = "{{text}}"
    # generation
    references: tuple[str, ...] = ()
    until: tuple[str, ...] = ()
    max_tokens: int = 256
    metrics: tuple[str, ...] = ("exact_match",)
    extract: dict[str, Extractor] = field(default_factory=dict)  # name -> extractor; none: the whole output
    ignore_case: bool = False
    ignore_punctuation: bool = False
    regexes_to_ignore: tuple[str, ...] = ()
    # grouping: a template naming each item's subject (MMLU's "anatomy"); the report then gives every
    # subject's metrics too, computed as the task's are but over that subject's items only
    subject: str | None = None
    # bookkeeping
    doc: str = ""  # what the task is, for people
    source: str = "<inline>"  # the task file
    lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)  # key -> line in the file

    def where(self, key: str) -> str:
        line = self.lines.get(key)
        return f"{self.source}:{line}" if line else self.source

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where(key)}: {key}: {message}")

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise self.error("kind", f"must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not self.name:
            raise self.error("name", "is empty: name the task")
        if not self.data:
            raise self.error("data", "give the data file(s): a path relative to --data-root, or a list")
        if self.kind in ("multiple_choice", "generation") and not self.prompt:
            raise self.error("prompt", f"a {self.kind} task needs a prompt template")
        if self.kind == "multiple_choice":
            if not self.choices:
                raise self.error("choices", "give a column holding the list of choices, or a list of templates")
            if not self.gold:
                raise self.error("gold", "give the template of the right answer (e.g. \"{{answer}}\")")
            if self.gold_type not in GOLD_TYPES:
                raise self.error("gold_type", f"must be one of {', '.join(GOLD_TYPES)}, got {self.gold_type!r}")
        if self.kind == "generation":
            if not self.references:
                raise self.error("references", "a generation task needs the reference answer template(s)")
            unknown = sorted(set(self.metrics) - set(GENERATION_METRICS))
            if unknown or not self.metrics:
                raise self.error("metrics", f"unknown {unknown}; choose from {', '.join(GENERATION_METRICS)}")
            if self.max_tokens < 1:
                raise self.error("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if self.num_fewshot < 0:
            raise self.error("num_fewshot", f"must be >= 0, got {self.num_fewshot}")
        if self.num_fewshot and self.kind == "perplexity":
            raise self.error("num_fewshot", "perplexity tasks take no few-shot examples")
        if self.num_fewshot and not self.fewshot_data:
            raise self.error("fewshot_data", "num_fewshot > 0 needs the file(s) the examples come from")
        if self.format == "lines" and not self.lines_fields:
            raise self.error("lines_fields", "format: lines needs the name of each line of a record")


# -- loading ----------------------------------------------------------------------------------------

_TUPLE_FIELDS = {"data", "lines_fields", "fewshot_data", "references", "until", "metrics", "regexes_to_ignore"}


def _as_tuple(value: Any) -> tuple:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return (value,) if value is not None else ()


def spec_from_mapping(raw: dict[str, Any], source: str = "<inline>", lines: dict[str, int] | None = None,
                      ) -> TaskSpec:
    """A TaskSpec from parsed YAML/JSON; unknown keys and wrong types are refused naming the key."""
    lines = lines or {}
    known = {f.name for f in fields(TaskSpec)} - {"source", "lines"}
    aliases = {"reference": "references"}

    def fail(key: str, message: str) -> ConfigError:
        where = f"{source}:{lines[key]}" if key in lines else source
        return ConfigError(f"{where}: {key}: {message}")

    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a task file is a mapping of keys (name, kind, data, prompt ...), "
                          f"got {type(raw).__name__}")
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        name = aliases.get(key, key)
        if name not in known:
            raise fail(key, f"unknown key; known keys: {', '.join(sorted(known))}")
        if name in _TUPLE_FIELDS:
            value = _as_tuple(value)
            if not all(isinstance(v, str) for v in value):
                raise fail(key, "must be a string or a list of strings")
        elif name == "choices":
            value = value if isinstance(value, str) else _as_tuple(value)
            if not isinstance(value, str) and not all(isinstance(v, str) for v in value):
                raise fail(key, "must be a column name or a list of templates")
        elif name == "extract":
            if not isinstance(value, dict):
                raise fail(key, "must map a name to {regex: ..., select: 0 or -1, fallback: ...}")
            try:
                value = {str(k): Extractor(**v) for k, v in value.items()}
            except TypeError as err:
                raise fail(key, f"{err}: each extractor has regex, select and fallback") from None
        elif name == "join_lines":
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise fail(key, "must map a column name to a file (one value per line)")
        elif name in ("num_fewshot", "max_tokens") and (not isinstance(value, int) or isinstance(value, bool)):
            raise fail(key, f"must be an integer, got {value!r}")
        elif name in ("ignore_case", "ignore_punctuation") and not isinstance(value, bool):
            raise fail(key, f"must be true or false, got {value!r}")
        elif name not in ("num_fewshot", "max_tokens", "ignore_case", "ignore_punctuation") and not (
                value is None or isinstance(value, str)):
            raise fail(key, f"must be a string, got {type(value).__name__}")
        kwargs[name] = value
        if key != name and key in lines:
            lines[name] = lines[key]
    for required in ("name", "kind", "data"):
        if required not in kwargs:
            raise ConfigError(f"{source}: missing key {required!r} (every task has name, kind and data)")
    return TaskSpec(**kwargs, source=source, lines=dict(lines))


def parse_task_text(text: str, source: str = "<inline>") -> TaskSpec:
    """Parse a task from YAML (JSON is YAML too), remembering the line of every top-level key."""
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise ConfigError(f"{where}: not valid YAML/JSON: {getattr(err, 'problem', err)}") from None
    lines = {}
    if isinstance(node, yaml.MappingNode):
        lines = {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    return spec_from_mapping(raw if raw is not None else {}, source, lines)


def load_task(name_or_path: str | Path) -> TaskSpec:
    """A task file (.yaml/.yml/.json), or the name of one shipped in serve/evaluation/tasks/."""
    path = Path(name_or_path)
    if not path.is_file():
        builtin = BUILTIN_DIR / f"{name_or_path}.yaml"
        if builtin.is_file():
            path = builtin
        else:
            raise ConfigError(f"--task {name_or_path}: no such task file, and not a built-in task "
                              f"({', '.join(builtin_tasks())})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the task file: {err}") from None
    return parse_task_text(text, str(path))


def builtin_tasks() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def spec_fingerprint(spec: TaskSpec) -> str:
    """A stable hash of what the task asks (not where its file lies): part of the resume cache's key."""
    import hashlib

    # `subject` only groups the answers: it changes no request, so caches made before it was set stay valid.
    payload = {f.name: getattr(spec, f.name) for f in fields(spec)
               if f.name not in ("source", "lines", "doc", "subject")}
    payload["extract"] = {k: vars(v) for k, v in spec.extract.items()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:16]
