"""The same requests through every backend's gRPC server: the same finish reasons and usage counts, and greedy
outputs identical to the reference backend's (the native engine) token for token."""

from __future__ import annotations

import math

import pytest

from serve.api._gen.lmforge.v1 import generation_pb2

from .conftest import REFERENCE, supporting, supports

PROMPTS = ["Return the", "def main():\n    ", "The value of", "import os\nimport", "Raise an exception if",
           "class Parser:\n    def"]
NUM_GREEDY_TOKENS = 32


def _greedy(client, prompt, **extra):
    return client.generate(prompt, temperature=0, max_tokens=NUM_GREEDY_TOKENS, logprobs=2, **extra)


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _margin(position) -> str:
    """Logit margin at a position: top-1 minus top-2 logprob (equal to the logit difference)."""
    top = sorted((t.logprob for t in position.top), reverse=True)
    return f"{top[0] - top[1]:.3g}" if len(top) >= 2 else "n/a"


def test_greedy_outputs_are_identical_across_backends(all_servers):
    """Where fp32 kernels differ, a near-tie can flip: the message shows where and how close both were."""
    outputs = {}
    for name, s in all_servers.items():
        with s.client() as client:
            outputs[name] = [_greedy(client, p, ignore_eos=True) for p in PROMPTS]
    problems = []
    for name, responses in outputs.items():
        for prompt, ours, ref in zip(PROMPTS, responses, outputs[REFERENCE]):
            a, b = list(ref.completions[0].token_ids), list(ours.completions[0].token_ids)
            i = _first_difference(a, b)
            if i is not None:
                problems.append(f"{prompt!r}: {REFERENCE} and {name} differ first at generated token {i}: "
                                f"{a[i:i + 3]} vs {b[i:i + 3]}; top-1 minus top-2 logprob there: {REFERENCE} "
                                f"{_margin(ref.completions[0].logprobs[i])}, {name} "
                                f"{_margin(ours.completions[0].logprobs[i])}")
            else:  # same tokens: their logprobs agree to fp32 kernel noise
                for x, y in zip(ref.completions[0].logprobs, ours.completions[0].logprobs):
                    assert y.chosen.logprob == pytest.approx(x.chosen.logprob, abs=2e-3), (prompt, name)
    assert not problems, "\n".join(problems)


def _case_requests(reference_client) -> list[tuple[str, str | list[int], dict]]:
    """(what, prompt, sampling) cases whose outcome is fixed by the reference's greedy output."""
    ref = list(_greedy(reference_client, PROMPTS[0], ignore_eos=True).completions[0].token_ids)
    text = reference_client.detokenize(ref[:8])
    stop_string = text[len(text) // 2:][:3].strip() or text[-2:]
    return [
        ("max_tokens", PROMPTS[0], dict(temperature=0, max_tokens=7, ignore_eos=True)),
        ("stop token", PROMPTS[0], dict(temperature=0, max_tokens=20, stop_token_ids=[ref[4]])),
        ("stop string", PROMPTS[0], dict(temperature=0, max_tokens=20, stop=[stop_string])),
        ("stop string kept", PROMPTS[0], dict(temperature=0, max_tokens=20, stop=[stop_string],
                                               include_stop_str_in_output=True)),
        ("min_tokens", PROMPTS[1], dict(temperature=0, max_tokens=9, min_tokens=5)),
        ("n=3 sampled", PROMPTS[2], dict(temperature=1.0, seed=5, n=3, max_tokens=6, ignore_eos=True)),
        ("top-k/top-p/penalties", PROMPTS[3], dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.01,
                                                   repetition_penalty=1.2, presence_penalty=0.5,
                                                   frequency_penalty=0.3, seed=1, max_tokens=10, ignore_eos=True)),
        ("clipped to the context", [5] * 508, dict(temperature=0, max_tokens=50, ignore_eos=True)),
        ("chat", [("user", "What does it return?")], dict(temperature=0, max_tokens=8, ignore_eos=True)),
    ]


def _summary(response) -> dict:
    completions = sorted(response.completions, key=lambda c: c.index)
    return {"finish": [generation_pb2.FinishReason.Name(c.finish_reason) for c in completions],
            "stop_reason": [c.WhichOneof("stop_reason") and getattr(c, c.WhichOneof("stop_reason"))
                            for c in completions],
            "prompt_tokens": response.usage.prompt_tokens, "completion_tokens": response.usage.completion_tokens,
            "lengths": [len(c.token_ids) for c in completions]}


def test_same_requests_same_finish_reasons_and_usage(all_servers):
    with all_servers[REFERENCE].client() as client:
        cases = _case_requests(client)
    results = {}
    for name, s in all_servers.items():
        with s.client() as client:  # n > 1 only where the backend offers it (else INVALID_ARGUMENT naming n)
            results[name] = {what: client.generate(prompt, **sampling) for what, prompt, sampling in cases
                             if sampling.get("n", 1) == 1 or supports(s, "n>1")}
    for what, _, sampling in cases:
        expected = _summary(results[REFERENCE][what])
        for name, by_case in ((n, r) for n, r in results.items() if what in r):
            got = _summary(by_case[what])
            assert got == expected, f"{what}: {name} {got} vs {REFERENCE} {expected}"
            if sampling.get("temperature") == 0:  # greedy: the text too
                assert [c.text for c in by_case[what].completions] == \
                       [c.text for c in results[REFERENCE][what].completions], (what, name)
    # the cases do what they say (on the reference)
    ref = {what: _summary(r) for what, r in results[REFERENCE].items()}
    assert ref["stop token"]["finish"] == ["FINISH_REASON_STOP"] and ref["stop token"]["completion_tokens"] <= 5
    assert ref["stop string"]["finish"] == ["FINISH_REASON_STOP_STRING"]
    assert ref["n=3 sampled"]["completion_tokens"] == 18
    assert ref["clipped to the context"] == dict(ref["clipped to the context"], completion_tokens=4,
                                                 finish=["FINISH_REASON_LENGTH"])


def test_streamed_deltas_add_up_to_the_unary_answer(backend_server):
    with backend_server.client() as client:
        whole = client.generate(PROMPTS[4], temperature=0, max_tokens=12, ignore_eos=True)
        chunks = list(client.stream(PROMPTS[4], temperature=0, max_tokens=12, ignore_eos=True))
    assert [t for c in chunks for comp in c.completions for t in comp.token_ids] == list(whole.completions[0].token_ids)
    assert chunks[-1].finished and chunks[-1].usage.completion_tokens == 12
    assert "".join(comp.text for c in chunks for comp in c.completions) == whole.completions[0].text


def test_prompt_logprobs_agree(all_servers):
    """The numbers scoring is built on: every prompt token's logprob, from each backend."""
    ids = None
    got = {}
    for name, s in supporting(all_servers, "prompt_logprobs").items():
        with s.client() as client:
            ids = ids or client.tokenize(PROMPTS[5] + " return the value of the parser")
            response = client.generate(ids, temperature=0, max_tokens=1, prompt_logprobs=1)
            got[name] = [p.chosen.logprob if p.HasField("chosen") else None for p in response.prompt_logprobs]
    for name, values in got.items():
        assert len(values) == len(ids) and values[0] is None
        assert values[1:] == pytest.approx(got[REFERENCE][1:], abs=2e-3), name
        assert all(math.isfinite(v) and v <= 0 for v in values[1:])
