"""Cancel, deadline and bad input through every backend: the same status codes and messages, the request
stopped in the engine (its KV blocks free again), and the server serving on."""

from __future__ import annotations

import time

import grpc
import pytest

from serve.api._gen.lmforge.v1 import generation_pb2, scoring_pb2
from tests.serve.api.test_bad_requests import BAD_GENERATE

from .conftest import REFERENCE, supports

LONG = dict(temperature=0, max_tokens=480, ignore_eos=True)


def _wait_idle(backend, timeout_s: float = 60.0) -> None:
    """The backend's own stats say nothing runs or waits and every KV block is free (a state, not a duration)."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = backend.stats()
        if s.num_running == 0 and s.num_waiting == 0 and s.kv_cache_usage == 0.0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{backend.name}: still busy after {timeout_s} s: {s}")
        time.sleep(0.01)


def _code(call) -> tuple[str, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code().name, err.value.details()


def _outcomes(server) -> dict[str, tuple[str, str]]:
    backend = server.backend
    out: dict[str, tuple[str, str]] = {}
    with server.client() as client:
        _wait_idle(backend)
        before = backend.stats().num_generation_tokens_total
        stream = client.stream("Return the", **LONG)
        next(stream)
        stream.cancel()
        out["cancel"] = _code(lambda: list(stream))
        _wait_idle(backend)
        assert backend.stats().num_generation_tokens_total - before < LONG["max_tokens"], "cancel did not stop it"
        for streaming in (False, True):
            call = (lambda: list(client.stream("Return the", timeout_s=0.05, **LONG))) if streaming else \
                (lambda: client.generate("Return the", timeout_s=0.05, **LONG))
            code, _ = _code(call)  # the message is gRPC's own ("Deadline Exceeded")
            out[f"deadline streaming={streaming}"] = (code, "")
            _wait_idle(backend)
        for what, fields, _ in BAD_GENERATE:
            request = generation_pb2.GenerateRequest(**fields)
            out[f"bad: {what}"] = _code(lambda: client.generation.Generate(request, timeout=30))
        if supports(server, "scoring"):  # where scoring is unsupported, Score is refused before any check
            out["bad score"] = _code(lambda: client.scoring.Score(scoring_pb2.ScoreRequest(
                loglikelihood=[scoring_pb2.LoglikelihoodQuery(continuations=[])]), timeout=30))
        out["bad detokenize"] = _code(lambda: client.detokenize([1, 512]))
        assert client.generate("Return the", max_tokens=2).finished  # still serving
    return out


def test_cancel_deadline_and_bad_input_give_the_same_status_everywhere(all_servers):
    outcomes = {name: _outcomes(s) for name, s in all_servers.items()}
    ref = outcomes[REFERENCE]
    assert ref["cancel"][0] == "CANCELLED" and ref["deadline streaming=True"][0] == "DEADLINE_EXCEEDED"
    assert all(code == "INVALID_ARGUMENT" for what, (code, _) in ref.items() if what.startswith("bad"))
    for name, got in outcomes.items():
        differ = {what: (got[what], ref[what]) for what in got if got[what] != ref[what]}
        assert set(ref) - set(got) <= {"bad score"}, (name, set(ref) - set(got))
        assert not differ, f"{name} vs {REFERENCE}: {differ}"


def test_speculation_forced_per_request_is_refused_naming_the_field(all_servers):
    """None of the suite's servers runs a speculator: a request forcing speculation on is INVALID_ARGUMENT
    naming the field on every backend, rather than silently running unspeculated, and the server keeps serving."""
    for name, server in all_servers.items():
        with server.client() as client:
            code, details = _code(lambda: client.generate("Return the", max_tokens=4, speculative=True))
            assert code == "INVALID_ARGUMENT" and details.startswith("sampling.speculative: "), (name, details)
            assert client.generate("Return the", max_tokens=2, speculative=False).finished, name
