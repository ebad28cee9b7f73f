"""`lmforge eval` against a real server: the numbers are the server's scores; a killed run resumes;
RESOURCE_EXHAUSTED is retried; a task whose data lacks a column fails before any request, naming it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lifecycle.cli import main
from serve.api.grpc_server import GrpcServerConfig
from serve.backends.native import NativeBackend
from serve.evaluation.cli import EvalConfig, evaluate
from tests.serve.api.conftest import BackgroundServer, engine_config

from ..api.conftest import wait_until


def _eval(server, root, tmp_path, *tasks, **overrides):
    cfg = EvalConfig(target=f"grpc://{server.target}", task=[str(root / t) for t in tasks], progress=False,
                     output=str(tmp_path / "report.json"), **overrides)
    lines = []
    report = evaluate(cfg, print_fn=lines.append)
    return report, "\n".join(lines)


def test_scores_are_the_servers_and_the_report_is_complete(eval_server, data_root, tmp_path):
    report, printed = _eval(eval_server, data_root, tmp_path, "mc.yaml", "ppl.yaml", "gen.yaml", limit=12)
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    mc = report["tasks"]["mc"]
    assert mc["num_items"] == 12 and 0 <= mc["metrics"]["acc"] <= 1 and "acc_norm_stderr" in mc["metrics"]
    rows = [json.loads(line) for line in (data_root / "mc.jsonl").read_text().splitlines()[:12]]
    with eval_server.client() as client:
        for item, row in zip(mc["items"], rows):
            direct = client.score(loglikelihood=[(f"Question: {row['question']}\nAnswer:",
                                                  [" " + c for c in row["choices"]])])
            # Not bit-equal: the second scoring of a context reads it from the prefix cache (prompt_logprobs_start),
            # and a chunk's attention then runs on another path, which sums in another order (fp32 noise).
            assert item["answer"]["logprobs"] == pytest.approx(
                [c.logprob for c in direct.loglikelihood[0].continuations], rel=1e-5, abs=1e-5)
            assert item["where"].endswith(f"mc.jsonl:{item['index'] + 1}")
        texts = [json.loads(line)["text"] for line in (data_root / "text.jsonl").read_text().splitlines()[:12]]
        rolled = client.score(rolling=texts).rolling
    ppl = report["tasks"]["ppl"]["metrics"]
    assert ppl["num_tokens"] == sum(r.num_tokens for r in rolled)
    assert ppl["token_perplexity"] == pytest.approx(2.718281828 ** (-sum(r.logprob for r in rolled) / ppl["num_tokens"]))
    assert {"exact_match", "bleu", "rouge1", "rougeL"} <= set(report["tasks"]["gen"]["metrics"])
    for needle in ("acc_norm", "token_perplexity", "bits_per_byte", "bleu", "report:"):
        assert needle in printed


def test_a_killed_run_resumes_without_asking_again(eval_server, data_root, tmp_path):
    output, cache = tmp_path / "killed.json", tmp_path / "killed.items.jsonl"
    argv = [sys.executable, "-m", "serve", "eval", "--target", f"grpc://{eval_server.target}", "--task",
            str(data_root / "mc.yaml"), "--concurrency", "1", "--output", str(output), "--no-progress"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: cache.is_file() and cache.read_text().count("\n") >= 5 or proc.poll() is not None,
                   "the eval to cache 5 items", timeout_s=300)
        os.kill(proc.pid, signal.SIGKILL)  # no cleanup runs: exactly what a crash or the OOM killer does
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed: give it more items"
    assert not output.exists()
    num_cached = sum(1 for line in cache.read_text().splitlines() if line.endswith("}"))
    assert 5 <= num_cached < 200
    resumed = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert f"{num_cached} of 200 items taken from" in resumed.stdout
    report = json.loads(output.read_text())["tasks"]["mc"]
    assert report["num_cached"] == num_cached and report["num_requested"] == 200 - num_cached
    # The same answers as a run never interrupted (to float noise: the engine batches differently at
    # another concurrency, which moves sums of fp32 logprobs by ~1e-7).
    fresh, _ = _eval(eval_server, data_root, tmp_path / "fresh", "mc.yaml")
    for resumed_item, fresh_item in zip(report["items"], fresh["tasks"]["mc"]["items"]):
        assert resumed_item["answer"]["logprobs"] == pytest.approx(fresh_item["answer"]["logprobs"], abs=1e-4)
    assert report["metrics"]["acc"] == fresh["tasks"]["mc"]["metrics"]["acc"]


def test_resource_exhausted_is_retried(trained_checkpoint, data_root, tmp_path):
    server = BackgroundServer(NativeBackend(engine_config(trained_checkpoint)),
                              GrpcServerConfig(port=0, max_concurrent_requests=1, max_queue_length=0))
    try:
        report, _ = _eval(server, data_root, tmp_path, "mc.yaml", limit=24, concurrency=6)
    finally:
        server.stop()
    mc = report["tasks"]["mc"]
    assert mc["num_items"] == 24 and mc["num_retries"] > 0


def test_missing_column_fails_before_any_request(eval_server, data_root, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "gold": 0}\n{"question": "q", "gold": 1}\n')
    task = tmp_path / "bad.yaml"
    task.write_text((data_root / "mc.yaml").read_text().replace("data: mc.jsonl", f"data: {bad}"))
    code = main(["eval", "--target", f"grpc://{eval_server.target}", "--task", str(task), "--no-progress",
                 "--output", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}:2: no column 'choices'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.json").exists()


def test_an_unreachable_server_is_one_clear_line(data_root, tmp_path, capsys):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = main(["eval", "--target", f"grpc://127.0.0.1:{port}", "--task", str(data_root / "mc.yaml"),
                 "--max-attempts", "2", "--timeout-s", "5", "--output", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot reach grpc://127.0.0.1:{port}" in err and "UNAVAILABLE" in err, err


@pytest.mark.parametrize("argv, needle", [
    (["eval", "--task", "arc_easy"], "--target"),
    (["eval", "--target", "grpc://127.0.0.1:1"], "--task"),
    (["eval", "--target", "ftp://x", "--task", "arc_easy", "--data-root", "."], "grpc://host:port"),
    (["eval", "--target", "grpc://127.0.0.1:1", "--task", "nope"], "not a built-in task"),
    (["eval", "--target", "grpc://127.0.0.1:1", "--task", "arc_easy", "--data-root", "/nonexistent"], "arc_easy.jsonl"),
    (["eval", "--target", "grpc://127.0.0.1:1", "--task", "arc_easy", "--output", "/"], "--output /: is a directory"),
    (["eval", "--target", "grpc://127.0.0.1:1", "--task", "arc_easy", "--cache", "/"], "--cache /: is a directory"),
])
def test_bad_flags(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in capsys.readouterr().err
