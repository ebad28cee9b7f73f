"""`lmforge chat` as a real process with piped input, against a real server: streamed replies, history,
the system prompt, /reset and /exit; and ChatSession's context trimming with a fake client."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from serve.api.grpc_server import GrpcServerConfig
from serve.backends.native import NativeBackend
from serve.chat import ChatSession, run_chat
from tests.serve.api.conftest import BackgroundServer, engine_config

SYSTEM = "You answer in one line."


@pytest.fixture(scope="module")
def chat_server(trained_checkpoint):
    server = BackgroundServer(NativeBackend(engine_config(trained_checkpoint)), GrpcServerConfig(port=0))
    yield server
    server.stop()


def _replies(stdout: str) -> list[str]:
    chunks = stdout.split("assistant> ")[1:]
    return [c.removesuffix("(conversation reset)\n").removesuffix("\n") for c in chunks]


def test_piped_chat_keeps_history_resets_and_exits(chat_server):
    script = "Hello there.\nWhat does it return?\n/reset\nHello there.\n/exit\nnever read\n"
    out = subprocess.run([sys.executable, "-m", "serve", "chat", "--target", f"grpc://{chat_server.target}",
                          "--system", SYSTEM, "--temperature", "0", "--max-tokens", "12"],
                         input=script, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "(conversation reset)" in out.stdout and "never read" not in out.stdout
    first, second, after_reset = _replies(out.stdout)
    greedy = dict(temperature=0.0, max_tokens=12)
    with chat_server.client() as client:
        def reply(*turns):
            messages = [("system", SYSTEM), *turns]
            return client.generate(messages, **greedy).completions[0].text

        assert first == reply(("user", "Hello there."))
        # The second turn was asked with the whole conversation so far.
        assert second == reply(("user", "Hello there."), ("assistant", first), ("user", "What does it return?"))
        assert after_reset == first  # /reset forgot everything but the system prompt


class FakeClient:
    """Tokenize counts characters; stream echoes the last user message back in two pieces."""

    def __init__(self, max_model_len: int = 100, refuse: bool = False) -> None:
        self.max_model_len, self.refuse = max_model_len, refuse
        self.sent: list[list[dict]] = []

    def model_info(self):
        return type("Info", (), {"max_model_len": self.max_model_len})()

    def tokenize(self, messages):
        return [0] * sum(len(m["content"]) for m in messages)

    def stream(self, messages, **sampling):
        self.sent.append(list(messages))
        if self.refuse:
            raise _RpcError()
        text = messages[-1]["content"].upper()
        for part in (text[:2], text[2:]):
            yield type("Chunk", (), {"completions": [type("C", (), {"text": part})()]})()


class _RpcError(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.INVALID_ARGUMENT

    def details(self):
        return "chat: too long"


def test_old_turns_are_dropped_to_fit_the_context(capsys):
    client = FakeClient(max_model_len=100)
    session = ChatSession(client, system="sys", max_tokens=20)
    for word in ("a" * 30, "b" * 30, "c" * 10):
        session.send(word, lambda _: None)
    # 3 + 30*4 + 10 characters > 80: the first exchange went, the second stayed.
    assert [m["content"] for m in client.sent[-1]] == ["sys", "b" * 30, "B" * 30, "c" * 10]
    assert "dropped the 2 oldest turns" in capsys.readouterr().err


def test_a_refused_turn_leaves_no_trace(capsys):
    import io

    session = ChatSession(FakeClient(refuse=True))
    out = io.StringIO()
    assert run_chat(session, ["hi\n", "/nope\n"], out, interactive=False) == 0
    assert "error: the server refused: INVALID_ARGUMENT: chat: too long" in out.getvalue()
    assert "unknown command /nope" in out.getvalue() and session.turns == []
