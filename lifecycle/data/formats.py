"""Fine-tuning record formats: instruction/chat data -> `Conversation`, preference data -> `PreferencePair`.

Formats (the LLaMA-Factory demo files in ../shared/data/sft and ../shared/data/preference are the
reference shapes):

- `alpaca`     {instruction, input?, output, system?, history?: [[user, assistant], ...]}
- `messages`   {messages: [{role, content}], system?}  (content may be a list of {type, value|text} parts)
- `sharegpt`   {conversations: [{from, value}], system?}  (human/gpt/system/function_call/observation)
- `pairwise`   {prompt | instruction+input | conversations | messages, chosen, rejected}; chosen and
               rejected are strings or one message ({from, value} / {role, content}); also
               {chosen_messages, rejected_messages} (whole dialogues sharing a prompt), and LLaMA-Factory's
               alpaca `output: [chosen, rejected]`
- `ranked`     {prompt | instruction+input, output: [best, ..., worst]} or {prompt, choices: [{text, rank}]}
               (rank 1 is best): expands to every ordered pair (better, worse)

The format is detected per file from its first valid record (`detect_format`) or forced. A record that
fits no format is reported with file, line and what is missing: `strict` stops on the first, otherwise
it is skipped and counted in `ReadStats` (which goes into the dataset manifest). A column map renames
the user's fields to ours before parsing (`parse_column_map("instruction=question,output=answer")`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from lifecycle.data.readers import ReadStats, expand_inputs
from lifecycle.errors import ConfigError, DataError

SftFormat = Literal["alpaca", "messages", "sharegpt"]
PreferenceFormat = Literal["pairwise", "ranked"]
SFT_FORMATS: tuple[str, ...] = get_args(SftFormat)
PREFERENCE_FORMATS: tuple[str, ...] = get_args(PreferenceFormat)
# ShareGPT speaker names -> chat roles. Tool calls are the assistant's turn; tool results are the tool's.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "bot": "assistant", "system": "system", "function_call": "assistant", "observation": "tool",
                  "tool": "tool"}
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class Conversation:
    """One SFT example: the dialogue ending with the assistant answer that is trained on."""

    messages: tuple[Message, ...]
    source: str
    line: int

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in self.messages]


@dataclass(frozen=True)
class PreferencePair:
    """One comparison: the prompt dialogue (ends with a user turn), a better and a worse answer."""

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    source: str
    line: int


class BadRecord(Exception):
    """Raised by a parser: the record does not fit; the message says what is missing."""


# ------------------------------------------------------------------------------------- reading


def parse_column_map(spec: str | None) -> dict[str, str]:
    """"ours=theirs,ours2=theirs2" -> {theirs: ours}; a flag, so a renamed column needs no code change."""
    if not spec:
        return {}
    mapping: dict[str, str] = {}
    for part in spec.split(","):
        ours, sep, theirs = part.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise ConfigError(f"--columns: {part!r} is not OURS=THEIRS (e.g. instruction=question,output=answer)")
        mapping[theirs.strip()] = ours.strip()
    return mapping


def iter_records(path: Path, stats: ReadStats, strict: bool) -> Iterator[tuple[int, Any]]:
    """(line, raw record) of a .jsonl/.json/.csv/.parquet file; unparseable lines are skipped and counted."""
    source = str(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="strict") as fh:
            try:
                for number, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        yield number, json.loads(line)
                    except json.JSONDecodeError as err:
                        skip(stats, strict, source, number, "invalid JSON", f"{err.msg} at column {err.colno}")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}: invalid UTF-8 ({err}); re-encode the file as UTF-8") from None
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8").removeprefix("\ufeff"))
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: invalid UTF-8 at byte offset {err.start}") from None
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON at column {err.colno}: {err.msg}") from None
        if isinstance(data, dict):
            data = next((data[k] for k in ("data", "rows") if isinstance(data.get(k), list)), data)
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records (or {{\"data\": [...]}}), got "
                            f"{type(data).__name__}")
        yield from enumerate(data, 1)  # "line" of a .json list is the record's 1-based index
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as fh:
            for number, row in enumerate(csv.DictReader(fh), 2):  # line 1 is the header
                yield number, {k: _maybe_json(v) for k, v in row.items() if k is not None}
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from enumerate(pq.read_table(path).to_pylist(), 1)
    else:
        raise DataError(f"{path}: fine-tuning data must be .jsonl, .json, .csv or .parquet")


def _maybe_json(value: str) -> Any:
    """CSV cells holding lists/objects (history, messages, ranked outputs) are JSON text."""
    if value and value.lstrip()[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def skip(stats: ReadStats, strict: bool, source: str, line: int, reason: str, detail: str = "") -> None:
    if strict:
        raise DataError(f"{source}:{line}: {reason}" + (f": {detail}" if detail else "")
                        + "; fix or remove this record, or drop --strict to skip and count it")
    stats.record_skip(source, line, reason, detail)


# ------------------------------------------------------------------------------------- parsing


def _text(value: Any, where: str) -> str:
    """A message content: a string, or a list of {type: text, value|text} parts (LLaMA-Factory v1)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        parts = [p.get("value", p.get("text")) for p in value if p.get("type", "text") == "text"]
        if parts and all(isinstance(p, str) for p in parts):
            return "".join(parts)
    raise BadRecord(f"{where} is not text (a string or a list of text parts)")


def _require(record: dict[str, Any], key: str) -> Any:
    if key not in record or record[key] is None:
        keys = ", ".join(map(str, record)) or "(none)"
        raise BadRecord(f'missing "{key}" (record has {keys})')
    return record[key]


def _messages_field(items: Any, key: str) -> list[Message]:
    """`messages` ({role, content}) or `conversations` ({from, value}) -> Messages."""
    if not isinstance(items, list) or not items:
        raise BadRecord(f'"{key}" must be a non-empty list')
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadRecord(f'"{key}"[{i}] is not an object')
        if "from" in item or "value" in item:
            speaker = item.get("from")
            if speaker not in SHAREGPT_ROLES:
                raise BadRecord(f'"{key}"[{i}].from is {speaker!r}; expected one of {", ".join(SHAREGPT_ROLES)}')
            out.append(Message(SHAREGPT_ROLES[speaker], _text(item.get("value"), f'"{key}"[{i}].value')))
        else:
            role = item.get("role")
            if role not in ROLES:
                raise BadRecord(f'"{key}"[{i}].role is {role!r}; expected one of {", ".join(ROLES)}')
            out.append(Message(role, _text(item.get("content"), f'"{key}"[{i}].content')))
    return out


def _with_system(messages: list[Message], record: dict[str, Any]) -> list[Message]:
    system = record.get("system")
    if system and not (messages and messages[0].role == "system"):
        return [Message("system", _text(system, '"system"')), *messages]
    return messages


def _alpaca_prompt(record: dict[str, Any]) -> list[Message]:
    """system?, history turns, then instruction (+ "\n\n" + input) as the last user turn."""
    instruction = _text(_require(record, "instruction"), '"instruction"')
    extra = record.get("input") or ""
    user = instruction + ("\n\n" + _text(extra, '"input"') if extra else "")
    turns: list[Message] = []
    history = record.get("history") or []
    if not isinstance(history, list):
        raise BadRecord('"history" must be a list of [user, assistant] pairs')
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise BadRecord(f'"history"[{i}] must be a [user, assistant] pair')
        turns += [Message("user", _text(pair[0], f'"history"[{i}][0]')),
                  Message("assistant", _text(pair[1], f'"history"[{i}][1]'))]
    return _with_system([*turns, Message("user", user)], record)


def _check_dialogue(messages: list[Message]) -> None:
    body = [m for m in messages if m.role != "system"]
    if not body or body[-1].role != "assistant":
        raise BadRecord("the dialogue must end with an assistant turn (nothing to train on)")
    if not any(m.role in ("user", "tool") for m in body):
        raise BadRecord("the dialogue has no user turn")


def parse_sft(record: Any, fmt: str) -> list[Message]:
    if not isinstance(record, dict):
        raise BadRecord(f"not an object (got {type(record).__name__})")
    if fmt == "alpaca":
        messages = [*_alpaca_prompt(record), Message("assistant", _text(_require(record, "output"), '"output"'))]
    elif fmt == "messages":
        messages = _with_system(_messages_field(_require(record, "messages"), "messages"), record)
    elif fmt == "sharegpt":
        messages = _with_system(_messages_field(_require(record, "conversations"), "conversations"), record)
    else:
        raise ConfigError(f"--format {fmt!r} is not an SFT format ({', '.join(SFT_FORMATS)})")
    _check_dialogue(messages)
    return messages


def _answer(value: Any, key: str) -> str:
    """A chosen/rejected answer: a string or one message object."""
    if isinstance(value, dict):
        return _text(value.get("value", value.get("content")), f'"{key}"')
    return _text(value, f'"{key}"')


def _preference_prompt(record: dict[str, Any]) -> list[Message]:
    if "prompt" in record:
        prompt = record["prompt"]
        messages = _messages_field(prompt, "prompt") if isinstance(prompt, list) else \
            [Message("user", _text(prompt, '"prompt"'))]
        messages = _with_system(messages, record)
    elif "instruction" in record:
        messages = _alpaca_prompt(record)
    elif "conversations" in record or "messages" in record:
        key = "conversations" if "conversations" in record else "messages"
        messages = _with_system(_messages_field(record[key], key), record)
    else:
        raise BadRecord('missing the prompt: "prompt", "instruction" or "conversations"/"messages"')
    if messages[-1].role not in ("user", "tool"):
        raise BadRecord("the prompt must end with a user turn")
    return messages


def ranked_pairs(answers_best_first: Sequence[str]) -> list[tuple[str, str]]:
    """All ordered pairs (better, worse) of a ranking: n answers give n(n-1)/2 pairs."""
    return [(answers_best_first[i], answers_best_first[j])
            for i in range(len(answers_best_first)) for j in range(i + 1, len(answers_best_first))]


def parse_preference(record: Any, fmt: str) -> list[tuple[list[Message], str, str]]:
    """(prompt, chosen, rejected) triples of one record: one for pairwise, n(n-1)/2 for a ranked list."""
    if not isinstance(record, dict):
        raise BadRecord(f"not an object (got {type(record).__name__})")
    if fmt == "pairwise":
        if "chosen_messages" in record or "rejected_messages" in record:
            chosen = _messages_field(_require(record, "chosen_messages"), "chosen_messages")
            rejected = _messages_field(_require(record, "rejected_messages"), "rejected_messages")
            if chosen[:-1] != rejected[:-1] or chosen[-1].role != "assistant" or rejected[-1].role != "assistant":
                raise BadRecord('"chosen_messages" and "rejected_messages" must share the prompt and end with '
                                "an assistant turn")
            return [(chosen[:-1], chosen[-1].content, rejected[-1].content)]
        if "chosen" not in record and isinstance(record.get("output"), list):
            if len(record["output"]) != 2:
                raise BadRecord(f'"output" holds {len(record["output"])} answers; a pair needs 2 '
                                "(use --format ranked for a ranking)")
            return [(_preference_prompt(record), _answer(record["output"][0], "output[0]"),
                     _answer(record["output"][1], "output[1]"))]
        return [(_preference_prompt(record), _answer(_require(record, "chosen"), "chosen"),
                 _answer(_require(record, "rejected"), "rejected"))]
    if fmt == "ranked":
        prompt = _preference_prompt(record)
        if isinstance(record.get("choices"), list):
            ranked = []
            for i, choice in enumerate(record["choices"]):
                if not isinstance(choice, dict) or not isinstance(choice.get("rank"), (int, float)):
                    raise BadRecord(f'"choices"[{i}] needs a numeric "rank" (1 = best)')
                text = choice.get("text", choice.get("content", choice.get("response")))
                ranked.append((choice["rank"], _text(text, f'"choices"[{i}].text')))
            answers = [text for _, text in sorted(ranked, key=lambda r: r[0])]  # stable: ties keep file order
        else:
            output = _require(record, "output")
            if not isinstance(output, list):
                raise BadRecord('"output" must be a list of answers, best first')
            answers = [_answer(a, f"output[{i}]") for i, a in enumerate(output)]
        if len(answers) < 2:
            raise BadRecord("a ranking needs at least 2 answers")
        return [(prompt, better, worse) for better, worse in ranked_pairs(answers)]
    raise ConfigError(f"--format {fmt!r} is not a preference format ({', '.join(PREFERENCE_FORMATS)})")


def detect_format(record: Any, kind: Literal["sft", "preference"]) -> str | None:
    """The format a record is in, from its keys; None if it fits none of `kind`'s."""
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if kind == "sft":
        if "messages" in keys:
            return "messages"
        if "conversations" in keys:
            return "sharegpt"
        if "instruction" in keys:  # an alpaca record, though maybe a broken one: parse_sft says what is missing
            return "alpaca"
        return None
    if "choices" in keys or (isinstance(record.get("output"), list) and len(record["output"]) > 2):
        return "ranked"
    if {"chosen", "rejected"} <= keys or {"chosen_messages", "rejected_messages"} <= keys or \
            isinstance(record.get("output"), list):
        return "pairwise"
    return None


# ------------------------------------------------------------------------------------- files


def _rename(record: Any, columns: dict[str, str]) -> Any:
    if not columns or not isinstance(record, dict):
        return record
    return {columns.get(k, k): v for k, v in record.items()}


def _read(paths: Sequence[str | Path], kind: Literal["sft", "preference"], fmt: str | None,
          columns: dict[str, str], stats: ReadStats, strict: bool) -> Iterator[tuple[str, int, Any, str]]:
    formats = SFT_FORMATS if kind == "sft" else PREFERENCE_FORMATS
    if fmt is not None and fmt not in formats:
        raise ConfigError(f"--format {fmt!r} is not one of {', '.join(formats)} for {kind} data")
    for path in expand_inputs(list(paths)):
        source = str(path)
        stats.file(source)
        file_fmt = fmt
        for line, raw in iter_records(path, stats, strict):
            record = _rename(raw, columns)
            if file_fmt is None:
                file_fmt = detect_format(record, kind)
                if file_fmt is None:
                    keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
                    skip(stats, strict, source, line, f"fits no {kind} format",
                         f"keys are {keys}; expected {_expected(kind)} (map columns with --columns)")
                    continue
            yield source, line, record, file_fmt


def _expected(kind: str) -> str:
    if kind == "sft":
        return "instruction+output (alpaca), messages, or conversations (sharegpt)"
    return "prompt/instruction/conversations with chosen+rejected, output: [chosen, rejected], or a ranking"


def read_conversations(paths: Sequence[str | Path], *, fmt: str | None = None, columns: dict[str, str] | None = None,
                       stats: ReadStats | None = None, strict: bool = False) -> list[Conversation]:
    """Every SFT example in `paths`; bad records are counted in `stats` (or raise under `strict`)."""
    stats = stats if stats is not None else ReadStats()
    out = []
    for source, line, record, file_fmt in _read(paths, "sft", fmt, columns or {}, stats, strict):
        try:
            messages = parse_sft(record, file_fmt)
        except BadRecord as err:
            skip(stats, strict, source, line, f"not a {file_fmt} record", str(err))
            continue
        stats.record_document(source)
        out.append(Conversation(tuple(messages), source, line))
    return out


def read_preferences(paths: Sequence[str | Path], *, fmt: str | None = None, columns: dict[str, str] | None = None,
                     stats: ReadStats | None = None, strict: bool = False) -> list[PreferencePair]:
    """Every comparison in `paths` (ranked lists expanded to all ordered pairs)."""
    stats = stats if stats is not None else ReadStats()
    out = []
    for source, line, record, file_fmt in _read(paths, "preference", fmt, columns or {}, stats, strict):
        try:
            triples = parse_preference(record, file_fmt)
        except BadRecord as err:
            skip(stats, strict, source, line, f"not a {file_fmt} record", str(err))
            continue
        stats.record_document(source)
        out += [PreferencePair(tuple(p), c, r, source, line) for p, c, r in triples]
    return out
