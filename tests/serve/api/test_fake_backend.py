"""The API layer needs nothing but the Backend Protocol: a fake backend serves, and its failures become
INTERNAL for that call only."""

from __future__ import annotations

import grpc
import pytest

from serve.api.grpc_server import GrpcServerConfig
from serve.backends.base import Backend, ModelInfo
from serve.scoring import ScoreResult
from serve.types import CompletionOutput, EngineStats, FinishReason, InvalidRequestError, RequestOutput

from .conftest import BackgroundServer


class FakeBackend:
    """Echoes the prompt's ids back one per delta; the prompt [13] fails after its first delta."""

    name = "fake"

    def __init__(self) -> None:
        self.started = self.stopped = False

    async def start(self) -> None:
        self.started = True

    async def generate(self, request_id, prompt_token_ids, params, *, priority=0):
        for i, token_id in enumerate(prompt_token_ids):
            if i == 1 and list(prompt_token_ids) == [13, 13]:
                raise RuntimeError("the fake engine broke")
            last = i == len(prompt_token_ids) - 1
            yield RequestOutput(request_id, (CompletionOutput(0, (token_id,), f"<{token_id}>",
                                                              finish_reason=FinishReason.STOP if last else None),),
                                finished=last, num_prompt_tokens=len(prompt_token_ids))

    async def score(self, request_id, loglikelihood, rolling, *, priority=0):
        return ScoreResult((), ())

    def tokenize(self, text):
        return [ord(c) for c in text]

    def render_chat(self, messages):
        raise InvalidRequestError("chat", "the fake has no chat template")

    def detokenize(self, token_ids, *, skip_special_tokens=True):
        return "".join(map(chr, token_ids))

    def model_info(self):
        return ModelInfo(name="fake", architecture="Fake", model_type="fake", vocab_size=128, max_model_len=64,
                         dtype="none", has_chat_template=False, eos_token_ids=(0,), backend=self.name)

    def stats(self):
        return EngineStats()

    def add_stats_listener(self, listener):
        pass  # no engine steps here

    def abort(self, request_id):
        pass  # nothing runs in the background here

    async def shutdown(self):
        self.stopped = True


@pytest.fixture(scope="module")
def fake():
    backend = FakeBackend()
    assert isinstance(backend, Backend)
    server = BackgroundServer(backend, GrpcServerConfig(port=0))
    yield server
    server.stop()
    assert backend.stopped


def test_fake_backend_serves_every_rpc(fake):
    with fake.client() as client:
        reply = client.generate("hey", max_tokens=5)
        assert reply.completions[0].text == "<104><101><121>" and list(reply.completions[0].token_ids) == [104, 101, 121]
        assert [c.completions[0].text for c in client.stream("ab")] == ["<97>", "<98>"]
        assert client.tokenize("ab") == [97, 98] and client.detokenize([97, 98]) == "ab"
        assert client.model_info().backend == "fake"
        with pytest.raises(grpc.RpcError) as err:
            client.generate("x" * 64)  # the model_info's 64-token context, checked before the backend
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("text: ")


def test_backend_failure_is_internal_for_that_call_only(fake):
    with fake.client() as client:
        stream = client.stream([13, 13])
        assert next(stream).completions[0].token_ids == [13]
        with pytest.raises(grpc.RpcError) as err:
            list(stream)
        assert err.value.code() == grpc.StatusCode.INTERNAL and "the fake engine broke" in err.value.details()
        assert client.generate("ok").finished
