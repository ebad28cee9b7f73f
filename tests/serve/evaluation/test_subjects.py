"""Per-subject scores (a task's `subject` template): the shipped MMLU, C-Eval and CMMLU tasks against a real
server, on small files laid out as in ../shared/data; the JSON report and the printed table give every subject."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest

from lifecycle.errors import DataError
from serve.evaluation.cli import EvalConfig, evaluate
from serve.evaluation.items import build_items
from serve.evaluation.records import Record
from serve.evaluation.task import parse_task_text, spec_fingerprint

from .conftest import _sentence

# task -> (folder under the data root, {file: subject}, header, gold column values)
LAYOUT = {
    "mmlu": ("eval/mmlu/test", {"anatomy_test.csv": "anatomy", "high_school_physics_test.csv": "high_school_physics"},
             ["question", "choice0", "choice1", "choice2", "choice3", "answer"], ["0", "1", "2", "3"]),
    "ceval": ("eval/ceval/val", {"accountant_val.csv": "accountant", "art_studies_val.csv": "art_studies"},
              ["id", "question", "A", "B", "C", "D", "answer"], ["A", "B", "C", "D"]),
    "cmmlu": ("eval/cmmlu/test", {"agronomy.csv": "agronomy", "world_history.csv": "world_history"},
              ["", "Question", "A", "B", "C", "D", "Answer"], ["A", "B", "C", "D"]),
}


def _write_layout(root: Path) -> dict[str, dict[str, int]]:
    """Files of 5 and 3 questions per task; returns task -> subject -> number of items."""
    rng = random.Random(1)
    sizes = {}
    for task, (folder, files, header, golds) in LAYOUT.items():
        (root / folder).mkdir(parents=True)
        sizes[task] = {}
        for (name, subject), n in zip(files.items(), (5, 3)):
            with open(root / folder / name, "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(header)
                for i in range(n):
                    body = [_sentence(rng, 6), *(_sentence(rng, rng.randint(1, 3)) for _ in range(4)), golds[i % 4]]
                    writer.writerow(body if header[0] == "question" else [str(i), *body])
            sizes[task][subject] = n
    return sizes


def test_builtin_tasks_report_every_subject(eval_server, tmp_path):
    sizes = _write_layout(tmp_path / "data")
    lines: list[str] = []
    report = evaluate(EvalConfig(target=f"grpc://{eval_server.target}", task=list(LAYOUT), progress=False,
                                 data_root=str(tmp_path / "data"), output=str(tmp_path / "report.json")),
                      print_fn=lines.append)
    printed = "\n".join(lines)
    for task, subject_sizes in sizes.items():
        entry = report["tasks"][task]
        subjects = entry["subjects"]
        assert {s: v["num_items"] for s, v in subjects.items()} == subject_sizes
        files = dict(zip(subject_sizes, LAYOUT[task][1]))
        for subject, values in subjects.items():
            mine = [it["metrics"] for it in entry["items"] if Path(it["where"].rsplit(":", 1)[0]).name == files[subject]]
            assert len(mine) == values["num_items"]
            assert values["acc"] == pytest.approx(sum(m["acc"] for m in mine) / len(mine))
            assert values["acc_norm"] == pytest.approx(sum(m["acc_norm"] for m in mine) / len(mine))
            assert f"  {subject}" in printed
        # The task's own accuracy stays pooled over items: the subjects' weighted by their sizes.
        pooled = sum(v["acc"] * v["num_items"] for v in subjects.values()) / entry["num_items"]
        assert entry["metrics"]["acc"] == pytest.approx(pooled)


SPEC = ('name: t\nkind: multiple_choice\ndata: x.jsonl\nprompt: "{{q}}"\nchoices: [a, b]\ngold: "0"\n'
        'subject: "{{ topic }}"\n')


def test_an_empty_or_missing_subject_names_the_record():
    spec = parse_task_text(SPEC, "t.yaml")
    with pytest.raises(DataError, match=r"d.jsonl:2: subject \(t.yaml:7\) is empty"):
        build_items(spec, [Record("d.jsonl", 1, {"q": "x", "topic": "a"}), Record("d.jsonl", 2, {"q": "y", "topic": " "})])
    with pytest.raises(DataError, match=r"d.jsonl:1: no column 'topic', which subject uses \(t.yaml:7\)"):
        build_items(spec, [Record("d.jsonl", 1, {"q": "x"})])


def test_subject_changes_no_request_so_a_resume_cache_stays_valid():
    with_subject = parse_task_text(SPEC, "t.yaml")
    without = parse_task_text(SPEC.replace('subject: "{{ topic }}"\n', ""), "t.yaml")
    assert spec_fingerprint(with_subject) == spec_fingerprint(without)
    records = [Record("d.jsonl", 1, {"q": "x", "topic": "a"})]
    assert [i.key() for i in build_items(with_subject, records)] == [i.key() for i in build_items(without, records)]


@pytest.mark.shared_data
@pytest.mark.parametrize("task, num_subjects", [("mmlu", 57), ("cmmlu", 67), ("ceval", 52)])
def test_the_shipped_tasks_find_every_subject_of_the_real_data(shared_data, task, num_subjects):
    """The published subject counts; names without the split suffix (lm-eval's subtask names)."""
    from serve.evaluation.data_root import DataRoot
    from serve.evaluation.dataset import load_items
    from serve.evaluation.task import load_task

    subjects = {item.subject for item in load_items(load_task(task), DataRoot(shared_data))}
    assert len(subjects) == num_subjects
    assert {"anatomy" if task != "ceval" else "accountant"} <= subjects
    assert not any(s.endswith(("_test", "_val")) or " " in s for s in subjects)
