"""Scoring and the Evaluation service on every backend: the same log-likelihoods (scoring is serve/scoring.py over
each backend's prompt logprobs) and so the same accuracy on a small multiple-choice task."""

from __future__ import annotations

import pytest

from .conftest import REFERENCE, supporting

MC_TASK = ('name: mc\nkind: multiple_choice\ndata: mc.jsonl\nprompt: "Question: {{question}}\\nAnswer:"\n'
           'choices: choices\ngold: "{{gold}}"\n')
ITEMS = [{"question": q, "choices": ["a list", "the module", "returns None", "the value"], "gold": g}
         for q, g in (("What does it return?", 2), ("What is imported?", 1), ("What is sorted?", 0),
                      ("Which value?", 3), ("Where is it defined?", 1), ("What is given?", 2),
                      ("What does the parser return?", 3), ("What is raised?", 0))]


def _evaluate(server):
    with server.client() as client:
        responses = list(client.evaluate(task_spec=MC_TASK, items=ITEMS, return_items=True))
    items = sorted((r.item for r in responses if r.WhichOneof("event") == "item"), key=lambda i: i.index)
    return responses[-1].result, items


def test_same_evaluation_accuracy(all_servers):
    results = {name: _evaluate(s) for name, s in supporting(all_servers, "scoring").items()}
    ref_result, ref_items = results[REFERENCE]
    assert ref_result.num_items == len(ITEMS)
    for name, (result, items) in results.items():
        for ours, ref in zip(items, ref_items):
            assert list(ours.logprobs) == pytest.approx(list(ref.logprobs), abs=2e-3), (name, ours.index)
        assert result.metrics["acc"] == ref_result.metrics["acc"], name
        assert result.metrics["acc_norm"] == ref_result.metrics["acc_norm"], name


def test_loglikelihood_and_rolling_scores_agree(all_servers):
    text = "def parse(path):\n    with open(path) as f:\n        return f.read()\n" * 40  # longer than the 512-token context: two windows
    got = {}
    for name, s in supporting(all_servers, "scoring").items():
        with s.client() as client:
            got[name] = client.score(loglikelihood=[("Return the", [" value", " list of names"])], rolling=[text])
    ref = got[REFERENCE]
    for name, response in got.items():
        ours = response.loglikelihood[0].continuations
        assert [c.logprob for c in ours] == pytest.approx([c.logprob for c in ref.loglikelihood[0].continuations],
                                                          abs=2e-3), name
        assert [c.is_greedy for c in ours] == [c.is_greedy for c in ref.loglikelihood[0].continuations], name
        assert response.rolling[0].logprob == pytest.approx(ref.rolling[0].logprob, rel=1e-4, abs=2e-2), name
        assert response.rolling[0].num_tokens == ref.rolling[0].num_tokens
        assert response.rolling[0].num_windows == ref.rolling[0].num_windows >= 2
