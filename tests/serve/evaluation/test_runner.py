"""run_task with a fake target: bounded concurrency, retries, a failure naming its item, resume from the cache."""

from __future__ import annotations

import json
import threading

import pytest

from serve.evaluation.cache import ResultCache, run_key
from serve.evaluation.items import build_items
from serve.evaluation.records import Record
from serve.evaluation.report import build_report, format_table
from serve.evaluation.retry import RetryPolicy
from serve.evaluation.runner import EvalRunError, run_task
from serve.evaluation.task import parse_task_text

from .fakes import FakeTarget, fake_logprob

MC = parse_task_text('name: mc\nkind: multiple_choice\ndata: x.jsonl\nprompt: "Q{{n}}:"\nchoices: [a, bb, ccc]\n'
                     'gold: "{{n % 3}}"\n', "mc.yaml")
FAST = RetryPolicy(initial_backoff_s=0.0, max_backoff_s=0.0)


def _items(n=30, spec=MC):
    return build_items(spec, [Record("d.jsonl", i + 1, {"n": i}) for i in range(n)])


def test_metrics_and_order(tmp_path):
    items = _items()
    run = run_task(MC, items, FakeTarget(), concurrency=4, retry=FAST, progress=False)
    assert [r.item.index for r in run.results] == list(range(30))
    expected = [float(max(range(3), key=lambda j: (fake_logprob(f"Q{i}:" + " " + "abc"[j] * (j + 1)), -j)) == i % 3)
                for i in range(30)]
    assert run.metrics["acc"] == pytest.approx(sum(expected) / 30)
    assert run.num_requested == 30 and run.num_cached == 0
    assert "acc_norm" in format_table([run]) and build_report({"model": "fake"}, [run])["tasks"]["mc"]["num_items"] == 30


def test_concurrency_is_bounded():
    gate = threading.Event()
    target = FakeTarget(gate=gate)
    threading.Timer(0.2, gate.set).start()  # let the pool fill up before anyone answers
    run_task(MC, _items(), target, concurrency=3, retry=FAST, progress=False)
    assert target.max_in_flight == 3


def test_transient_failures_are_retried():
    target = FakeTarget(transient_failures=5)
    run = run_task(MC, _items(10), target, concurrency=2, retry=FAST, progress=False)
    assert run.num_retries == 5 and len(run.results) == 10 and len(target.asked) == 15


def test_a_permanent_failure_names_the_item_and_keeps_what_finished(tmp_path):
    cache = ResultCache(tmp_path / "c.jsonl")
    target = FakeTarget(refuse_context="Q7:")
    with pytest.raises(EvalRunError, match=r"d.jsonl:8 \(item 7\): INVALID_ARGUMENT.*rerun to resume"):
        run_task(MC, _items(), target, cache=cache, concurrency=1, retry=FAST, progress=False)
    cache.close()
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 7


def test_resume_asks_only_what_is_missing(tmp_path):
    items = _items()
    first = FakeTarget()
    cache = ResultCache(tmp_path / "c.jsonl")
    full = run_task(MC, items, first, cache=cache, concurrency=4, retry=FAST, progress=False)
    cache.close()
    lines = (tmp_path / "c.jsonl").read_text().splitlines()
    # A killed run: 12 complete lines and half of the 13th.
    (tmp_path / "c.jsonl").write_text("\n".join(lines[:12]) + "\n" + lines[12][:20])
    second = FakeTarget()
    resumed = run_task(MC, items, second, cache=ResultCache(tmp_path / "c.jsonl"), concurrency=4, retry=FAST,
                       progress=False)
    assert resumed.num_cached == 12 and resumed.num_requested == 18 and len(second.asked) == 18
    assert [r.answer for r in resumed.results] == [r.answer for r in full.results]
    assert resumed.metrics == full.metrics
    for line in (tmp_path / "c.jsonl").read_text().splitlines()[13:]:
        json.loads(line)  # the appends after the partial line start on a fresh line


def test_cache_is_per_model_and_per_item_content(tmp_path):
    items = _items(5)
    cache = ResultCache(tmp_path / "c.jsonl")
    run_task(MC, items, FakeTarget(model="a"), cache=cache, retry=FAST, progress=False)
    other_model = run_task(MC, items, FakeTarget(model="b"), cache=cache, retry=FAST, progress=False)
    assert other_model.num_cached == 0
    assert run_key(MC, {"model": "a"}) != run_key(MC, {"model": "b"})
    changed = build_items(MC, [Record("d.jsonl", i + 1, {"n": i + (i == 2)}) for i in range(5)])
    again = run_task(MC, changed, FakeTarget(model="a"), cache=cache, retry=FAST, progress=False)
    assert again.num_cached == 4 and again.num_requested == 1
    cache.clear()
    assert not (tmp_path / "c.jsonl").exists()


def test_perplexity_and_generation_tasks():
    ppl = parse_task_text("name: p\nkind: perplexity\ndata: t.txt\n")
    run = run_task(ppl, build_items(ppl, [Record("t.txt", 1, {"text": "ab cd"}), Record("t.txt", 3, {"text": "x"})]),
                   FakeTarget(), retry=FAST, progress=False)
    assert run.metrics["num_bytes"] == 6 and run.metrics["num_words"] == 3 and run.metrics["token_perplexity"] > 1
    gen = parse_task_text('name: g\nkind: generation\ndata: g.jsonl\nprompt: "{{q}}"\nreference: "{{a}}"\n'
                          'metrics: [exact_match, bleu, rouge]\nextract: {num: {regex: "#### (\\\\d+)"}}\n')
    items = build_items(gen, [Record("g", 1, {"q": "2+2", "a": "4"}), Record("g", 2, {"q": "2+3", "a": "5"})])
    run = run_task(gen, items, FakeTarget(), retry=FAST, progress=False)
    assert run.metrics["exact_match/num"] == 0.5 and "bleu" in run.metrics and "rougeL" in run.metrics
