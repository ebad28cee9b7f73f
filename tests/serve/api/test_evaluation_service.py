"""The Evaluation service on a real server: jobs over inline items or files under --data-root stream progress
and metrics equal to the Scoring service's numbers; nothing outside the data root is opened; bad records are
INVALID_ARGUMENT naming item and column; a cancelled job frees the engine."""

from __future__ import annotations

import json
import os

import grpc
import pytest

from serve.evaluation.metrics import multiple_choice

from .conftest import wait_engine_idle

MC_TASK = ('name: mc\nkind: multiple_choice\ndata: mc.jsonl\nprompt: "Question: {{question}}\\nAnswer:"\n'
           'choices: choices\ngold: "{{gold}}"\n')
ITEMS = [{"question": q, "choices": ["a list", "the module", "returns None"], "gold": g}
         for q, g in (("What does it return?", 2), ("What is imported?", 1), ("What is sorted?", 0),
                      ("Which value?", 0), ("Where is it defined?", 1), ("What is given?", 2))]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("evalroot")
    outside = tmp_path_factory.mktemp("outside")
    (base / "data").mkdir()
    (base / "data" / "mc.jsonl").write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    (base / "mc.yaml").write_text(MC_TASK.replace("data: mc.jsonl", "data: data/mc.jsonl"))
    (outside / "secret.jsonl").write_text(json.dumps(ITEMS[0]) + "\n")
    os.symlink(outside / "secret.jsonl", base / "data" / "escape.jsonl")
    return base


@pytest.fixture(scope="module")
def root_server(start_server, root):
    return start_server(data_root=str(root))


def _run(client, **kwargs):
    responses = list(client.evaluate(**kwargs))
    assert responses[-1].WhichOneof("event") == "result"
    return responses


def test_inline_items_match_the_scoring_service(root_server):
    with root_server.client() as client:
        responses = _run(client, task_spec=MC_TASK, items=ITEMS, return_items=True, request_id="job-1")
        items = sorted((r.item for r in responses if r.WhichOneof("event") == "item"), key=lambda i: i.index)
        progress = [r.progress for r in responses if r.WhichOneof("event") == "progress"]
        result = responses[-1].result
        assert all(r.request_id == "job-1" for r in responses)
        assert [p.num_done for p in progress] == list(range(1, 7)) and progress[-1].num_total == 6
        assert result.task == "mc" and result.kind == "multiple_choice" and result.num_items == 6
        accs = []
        for item, row in zip(items, ITEMS):
            direct = client.score(loglikelihood=[(f"Question: {row['question']}\nAnswer:",
                                                  [" " + c for c in row["choices"]])])
            logprobs = [c.logprob for c in direct.loglikelihood[0].continuations]
            assert list(item.logprobs) == pytest.approx(logprobs, abs=1e-4)
            accs.append(multiple_choice(logprobs, row["choices"], row["gold"])["acc"])
            assert item.where == f"items:{item.index + 1}"
        assert result.metrics["acc"] == pytest.approx(sum(accs) / 6)
        assert set(result.metrics) >= {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr"}


def test_per_subject_results(root_server):
    """A task with a `subject` template: each item names its subject and the result gives every subject's
    metrics over its own items; the task's metrics stay pooled (the subjects' weighted by their sizes)."""
    spec = MC_TASK + 'subject: "{{ topic }}"\n'
    items = [dict(row, topic="geometry" if i % 3 == 0 else "history") for i, row in enumerate(ITEMS)]
    with root_server.client() as client:
        responses = _run(client, task_spec=spec, items=items, return_items=True)
    by_subject: dict[str, list] = {}
    for r in responses:
        if r.WhichOneof("event") == "item":
            assert r.item.subject == items[r.item.index]["topic"]
            by_subject.setdefault(r.item.subject, []).append(r.item.metrics["acc"])
    result = responses[-1].result
    assert set(result.subjects) == {"geometry", "history"}
    for name, accs in by_subject.items():
        assert result.subjects[name].num_items == len(accs)
        assert result.subjects[name].metrics["acc"] == pytest.approx(sum(accs) / len(accs))
        assert "acc_norm" in result.subjects[name].metrics
    assert result.metrics["acc"] == pytest.approx(
        sum(s.metrics["acc"] * s.num_items for s in result.subjects.values()) / result.num_items)
    with root_server.client() as client:  # no subject template: no subjects
        assert not _run(client, task_spec=MC_TASK, items=ITEMS)[-1].result.subjects


def test_files_under_the_data_root(root_server):
    with root_server.client() as client:
        by_task_data = _run(client, task_file="mc.yaml", limit=4)[-1].result
        by_data_files = _run(client, task_spec=MC_TASK, data_files=["data/m*.jsonl"], limit=4)
    assert by_task_data.num_items == 4 and by_task_data.metrics["acc"] == by_data_files[-1].result.metrics["acc"]


@pytest.mark.parametrize("kwargs, code, needle", [
    (dict(task_spec=MC_TASK, data_files=["/etc/passwd"]), "INVALID_ARGUMENT", "absolute"),
    (dict(task_spec=MC_TASK, data_files=["../outside/secret.jsonl"]), "INVALID_ARGUMENT", "'..'"),
    (dict(task_spec=MC_TASK, data_files=["data/../../x.jsonl"]), "INVALID_ARGUMENT", "'..'"),
    (dict(task_spec=MC_TASK, data_files=["data/escape.jsonl"]), "PERMISSION_DENIED", "outside"),
    (dict(task_spec=MC_TASK, data_files=["data/*"]), "PERMISSION_DENIED", "outside"),
    (dict(task_file="../mc.yaml"), "INVALID_ARGUMENT", "'..'"),
    (dict(task_file="/etc/hostname"), "INVALID_ARGUMENT", "absolute"),
    (dict(task_spec=MC_TASK, data_files=["data/none.jsonl"]), "NOT_FOUND", "not a file"),
    (dict(task_spec=MC_TASK.replace("mc.jsonl", "/etc/passwd")), "INVALID_ARGUMENT", "absolute"),
    (dict(task_spec=MC_TASK + "num_fewshot: 1\nfewshot_data: /etc/passwd\n", items=ITEMS), "INVALID_ARGUMENT", "absolute"),
])
def test_nothing_outside_the_data_root_is_opened(root_server, kwargs, code, needle):
    with root_server.client() as client, pytest.raises(grpc.RpcError) as err:
        list(client.evaluate(**kwargs))
    assert err.value.code().name == code and needle in err.value.details(), err.value.details()


def test_a_server_without_data_root_opens_no_file(server):
    with server.client() as client:
        with pytest.raises(grpc.RpcError) as err:
            list(client.evaluate(task_file="arc_easy"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--data-root" in err.value.details()
        assert _run(client, task_spec=MC_TASK, items=ITEMS[:2])[-1].result.num_items == 2  # inline items still work


@pytest.mark.parametrize("kwargs, needle", [
    (dict(task_spec=MC_TASK, items=[ITEMS[0], {"question": "q", "gold": 0}]), "items:2: no column 'choices'"),
    (dict(task_spec="name: x\nkind: sorting\ndata: d\n", items=ITEMS), "task_spec:2: kind"),
    (dict(task_spec=MC_TASK, items=ITEMS, max_concurrency=0), "max_concurrency"),
    (dict(task_spec=MC_TASK.replace("{{question}}", "{{ question.__class__.__mro__ }}"), items=ITEMS),
     "SecurityError"),  # templates from clients are sandboxed
    (dict(task_spec=MC_TASK, items=ITEMS, limit=0), "limit"),
    (dict(task_spec=MC_TASK, items=[ITEMS[0], {"question": "q", "choices": ["a", "the value " * 400], "gold": 0}]),
     "items:2"),  # a choice longer than the model's context
])
def test_bad_requests_are_invalid_argument(root_server, kwargs, needle):
    with root_server.client() as client, pytest.raises(grpc.RpcError) as err:
        list(client.evaluate(**kwargs))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details(), err.value.details()


def test_cancelling_a_job_frees_the_engine(root_server):
    many = [ITEMS[i % len(ITEMS)] for i in range(400)]
    with root_server.client() as client:
        stream = client.evaluate(task_spec=MC_TASK, items=many, max_concurrency=16)
        first = next(stream)
        assert first.WhichOneof("event") == "progress" and first.progress.num_total == 400
        stream.cancel()
        wait_engine_idle(root_server.engine)
        assert _run(client, task_spec=MC_TASK, items=ITEMS[:1])[-1].result.num_items == 1  # still serving
