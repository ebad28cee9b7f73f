"""Records -> items: prompts exactly as lm-eval 0.4 builds them; a missing column names file, line and column."""

from __future__ import annotations

import pytest

from lifecycle.errors import DataError
from serve.evaluation.items import GenerationRequest, LoglikelihoodRequest, RollingRequest, build_items, count_words
from serve.evaluation.records import Record, inline_records
from serve.evaluation.task import parse_task_text

MC = """\
name: mc
kind: multiple_choice
data: x.jsonl
prompt: "Q: {{question}}\\nA:"
choices: choices
gold: "{{answer}}"
"""


def _records(*rows, source="data.jsonl"):
    return [Record(source, i + 1, {"_source": "data", **row}) for i, row in enumerate(rows)]


def test_multiple_choice_item():
    items = build_items(parse_task_text(MC), _records({"question": "2+2?", "choices": ["3", "4"], "answer": 1}))
    assert items[0].request == LoglikelihoodRequest("Q: 2+2?\nA:", (" 3", " 4"))
    assert items[0].gold == 1 and items[0].choices == ("3", "4") and items[0].where == "data.jsonl:1"


@pytest.mark.parametrize("gold_type, raw, expected", [("index", "1", 1), ("index", 1.0, 1), ("letter", "B", 1),
                                                      ("text", "4", 1)])
def test_gold_types(gold_type, raw, expected):
    spec = parse_task_text(MC + f"gold_type: {gold_type}\n")
    items = build_items(spec, _records({"question": "q", "choices": ["3", "4"], "answer": raw}))
    assert items[0].gold == expected


def test_choices_from_templates_and_csv_list_literal():
    spec = parse_task_text(MC.replace("choices: choices", 'choices: ["{{a}}", "{{b}}"]'))
    items = build_items(spec, _records({"question": "q", "a": "x", "b": "y", "answer": 0}))
    assert items[0].request.continuations == (" x", " y")
    items = build_items(parse_task_text(MC), _records({"question": "q", "choices": "['x', 'y']", "answer": "0"}))
    assert items[0].choices == ("x", "y")


def test_missing_column_names_file_line_column_and_task_key():
    records = _records({"question": "q", "choices": ["a", "b"], "answer": 0}, {"choices": ["a", "b"], "answer": 0})
    with pytest.raises(DataError) as err:
        build_items(parse_task_text(MC, "mc.yaml"), records)
    message = str(err.value)
    assert "data.jsonl:2" in message and "'question'" in message and "mc.yaml:4" in message and "prompt" in message
    with pytest.raises(DataError, match=r"items:1: no column 'choices'"):
        build_items(parse_task_text(MC), inline_records([{"question": "q", "answer": 0}]))


def test_bad_gold_names_the_record():
    with pytest.raises(DataError, match=r"data.jsonl:1: gold .* rendered '5': no such choice"):
        build_items(parse_task_text(MC), _records({"question": "q", "choices": ["a", "b"], "answer": 5}))


def test_fewshot_context_as_lm_eval_and_never_the_item_itself():
    spec = parse_task_text(MC + 'preamble: "Quiz.\\n\\n"\nnum_fewshot: 1\nfewshot_data: x.jsonl\n')
    records = _records({"question": "1+1?", "choices": ["2", "3"], "answer": 0},
                       {"question": "2+2?", "choices": ["3", "4"], "answer": 1})
    items = build_items(spec, records, fewshot=records)
    assert items[0].request.context == "Quiz.\n\nQ: 2+2?\nA: 4\n\nQ: 1+1?\nA:"
    assert items[1].request.context == "Quiz.\n\nQ: 1+1?\nA: 2\n\nQ: 2+2?\nA:"


def test_perplexity_and_generation_items():
    ppl = build_items(parse_task_text("name: p\nkind: perplexity\ndata: t.txt\n"), _records({"text": "a b  c\nd"}))
    assert ppl[0].request == RollingRequest("a b  c\nd") and ppl[0].num_words == 4 and ppl[0].num_bytes == 8
    gen = parse_task_text('name: g\nkind: generation\ndata: g.jsonl\nprompt: "Q: {{q}}\\nA:"\nreference: "{{a}}"\n'
                          'until: ["Q:"]\nmax_tokens: 8\n')
    items = build_items(gen, _records({"q": "hi", "a": "#### 3"}))
    assert items[0].request == GenerationRequest("Q: hi\nA:", ("Q:",), 8) and items[0].references == ("#### 3",)


def test_limit_join_and_key():
    spec = parse_task_text(MC)
    records = _records(*({"question": f"q{i}", "choices": ["a", "b"]} for i in range(3)))
    items = build_items(spec, records, limit=2, joined={"answer": ["0", "1", "0"]})
    assert [i.gold for i in items] == [0, 1]
    with pytest.raises(DataError, match="line up"):
        build_items(spec, records, joined={"answer": ["0"]})
    again = build_items(spec, records, joined={"answer": ["0", "1", "0"]})
    assert items[0].key() == again[0].key() != again[1].key()


def test_count_words_as_lm_eval():
    assert count_words("a  b\nc") == 3 and count_words(" a") == 2  # re.split keeps the empty first piece


def test_templates_are_sandboxed():
    """The server renders templates its clients send: no way from a template into Python's internals."""
    spec = parse_task_text(MC.replace("Q: {{question}}", "{{ question.__class__.__mro__[1].__subclasses__() }}"))
    with pytest.raises(DataError, match="SecurityError|unsafe"):
        build_items(spec, _records({"question": "q", "choices": ["a", "b"], "answer": 0}))
