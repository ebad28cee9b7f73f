"""`lmforge serve` as a real process: SIGTERM drains gracefully; bad flags are refused naming them."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import grpc
import pytest

from lifecycle.cli import main
from serve.api._gen.lmforge.v1 import generation_pb2
from serve.client import Client

from .conftest import wait_until


def test_sigterm_drains_in_flight_requests_then_exits(trained_checkpoint):
    env = dict(os.environ, LMFORGE_TEST_TOKEN="t0ken")
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve", "serve", "--model", str(trained_checkpoint), "--port", "0",
         "--kv-cache-memory-bytes", str(1 << 20), "--grace-s", "300", "--auth-token-env", "LMFORGE_TEST_TOKEN"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        first_line = proc.stdout.readline()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", first_line)
        assert match, f"unexpected first line {first_line!r}"
        with Client(f"127.0.0.1:{match.group(1)}", token="t0ken") as client:
            client.wait_until_serving(timeout_s=300)
            # Long enough to be still running while the checks below happen (16 x 480 tokens + top-20 logprobs).
            stream = client.stream("Return the", temperature=0, max_tokens=480, ignore_eos=True, n=16, logprobs=20,
                                   timeout_s=300)
            first = next(stream)
            proc.send_signal(signal.SIGTERM)
            wait_until(lambda: client.health() == "NOT_SERVING", "health to turn NOT_SERVING")
            with pytest.raises(grpc.RpcError) as err:
                client.generate("Return the", max_tokens=1)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.value.details()
            chunks = [first, *stream]  # the in-flight stream runs to its end
        assert chunks[-1].finished
        per_completion = {}
        for chunk in chunks:
            for c in chunk.completions:
                per_completion.setdefault(c.index, []).append(c)
        assert sorted(per_completion) == list(range(16))
        for parts in per_completion.values():
            assert sum(len(p.token_ids) for p in parts) == 480
            assert parts[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output
        assert "shutting down" in output and output.rstrip().endswith("stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("flags, message", [
    ([], "--model: give the checkpoint directory"),
    (["--model", "{missing}"], "is not a directory"),
    (["--model", "{ckpt}", "--ngram", "--draft-model", "{ckpt}"], "--draft-model and --ngram"),
    (["--model", "{ckpt}", "--tls-cert", "{ckpt}/config.json"], "--tls-cert and --tls-key"),
    (["--model", "{ckpt}", "--auth-token-file", "{missing}"], "--auth-token-file"),
    (["--model", "{ckpt}", "--auth-token-env", "LMFORGE_SURELY_UNSET_VAR"], "$LMFORGE_SURELY_UNSET_VAR is not set"),
    (["--model", "{ckpt}", "--port", "70000"], "--port"),
    (["--model", "{ckpt}", "--http-port", "-1"], "--http-port"),
    (["--model", "{ckpt}", "--http-port", "8000", "--metrics-port", "8000"], "--metrics-port"),
])
def test_bad_flags_are_refused_naming_them(trained_checkpoint, tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.delenv("LMFORGE_SURELY_UNSET_VAR", raising=False)
    argv = ["serve", *(f.format(ckpt=trained_checkpoint, missing=tmp_path / "missing") for f in flags)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_busy_http_port_is_refused_naming_it(trained_checkpoint, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", str(trained_checkpoint), "--port", "0", "--http-port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
