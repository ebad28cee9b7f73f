"""Task files: parsed with each key's line remembered; bad keys and values refused naming file, line and key."""

from __future__ import annotations

import pytest

from lifecycle.errors import ConfigError
from serve.evaluation.task import builtin_tasks, load_task, parse_task_text, spec_fingerprint

ARC = """\
name: arc
kind: multiple_choice
data: arc.jsonl
prompt: "{{query}}\\nAnswer:"
choices: choices
gold: "{{gold}}"
"""


def test_parses_a_multiple_choice_task():
    spec = parse_task_text(ARC, "arc.yaml")
    assert spec.data == ("arc.jsonl",) and spec.choices == "choices" and spec.target_delimiter == " "
    assert spec.prompt == "{{query}}\nAnswer:"
    assert spec.where("gold") == "arc.yaml:6"


def test_json_is_accepted_too():
    spec = parse_task_text('{"name": "p", "kind": "perplexity", "data": ["a.txt", "b.txt"]}', "p.json")
    assert spec.data == ("a.txt", "b.txt") and spec.text == "{{text}}"


@pytest.mark.parametrize("text, needles", [
    (ARC + "promt: x\n", ["arc.yaml:7", "promt", "unknown key"]),
    (ARC.replace("multiple_choice", "classification"), ["arc.yaml:2", "kind", "multiple_choice"]),
    (ARC.replace('gold: "{{gold}}"\n', ""), ["arc.yaml", "gold"]),
    (ARC + "num_fewshot: 2\n", ["fewshot_data"]),
    (ARC + "num_fewshot: two\n", ["arc.yaml:7", "num_fewshot", "integer"]),
    (ARC + "gold_type: number\n", ["gold_type", "index, letter, text"]),
    ("name: g\nkind: generation\ndata: g.jsonl\nprompt: q\n", ["references"]),
    ("name: g\nkind: generation\ndata: g.jsonl\nprompt: q\nreference: a\nmetrics: [f1]\n", ["metrics", "f1"]),
    ("name: [x\n", ["arc.yaml:2", "not valid YAML"]),
    ("- a\n- b\n", ["mapping"]),
    ("kind: perplexity\ndata: a.txt\n", ["missing key 'name'"]),
])
def test_bad_task_files_are_refused_naming_the_place(text, needles):
    with pytest.raises(ConfigError) as err:
        parse_task_text(text, "arc.yaml")
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_builtin_tasks_load_and_fingerprints_differ():
    names = builtin_tasks()
    assert {"arc_easy", "hellaswag", "mmlu", "cmmlu", "ceval", "piqa", "gsm8k", "wikitext2"} <= set(names)
    prints = {spec_fingerprint(load_task(n)) for n in names}
    assert len(prints) == len(names)


def test_unknown_task_name_lists_the_builtins():
    with pytest.raises(ConfigError, match="arc_easy"):
        load_task("no_such_task")


def test_fingerprint_ignores_where_the_file_lies():
    assert spec_fingerprint(parse_task_text(ARC, "a.yaml")) == spec_fingerprint(parse_task_text(ARC, "b/c.yaml"))
    assert spec_fingerprint(parse_task_text(ARC, "a.yaml")) != spec_fingerprint(
        parse_task_text(ARC.replace("Answer:", "A:"), "a.yaml"))
