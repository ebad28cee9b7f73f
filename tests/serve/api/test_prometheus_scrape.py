"""A real Prometheus (Debian's binary, scrape interval 1 s, storage in a temporary folder) scraping a real
`lmforge serve --http-port 0 --metrics-port 0` under a few concurrent streaming requests over gRPC and the OpenAI
API: through Prometheus' query API, the TTFT histogram's count, the generated- and prompt-token counters and the
per-protocol call counters moved by exactly what the clients saw. Prometheus also loads deploy/'s alerting rules."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from serve.client import Client

from .conftest import wait_until

PROMETHEUS = shutil.which("prometheus")
ROOT = Path(__file__).resolve().parents[3]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="the prometheus binary is not installed (Debian package "
                                                           "`prometheus`; `make test` installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lines:
    """A process's stdout lines, read in a thread so that waiting for one can give up."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(line) for line in proc.stdout], daemon=True).start()

    def until(self, pattern: str, timeout_s: float = 300.0) -> re.Match:
        while True:
            try:
                line = self.lines.get(timeout=timeout_s)
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r}; output so far: {self.seen}") from None
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match


class PrometheusApi:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, promql: str) -> dict:
        """An instant query's `data` (resultType and result)."""
        with urllib.request.urlopen(f"{self.url}/api/v1/query?query={urllib.parse.quote(promql)}", timeout=10) as r:
            reply = json.loads(r.read())
        assert reply["status"] == "success", (promql, reply)
        return reply["data"]

    def value(self, promql: str) -> float | None:
        """An instant query's one value (None: no such series yet)."""
        data = self.query(promql)
        if data["resultType"] == "scalar":  # e.g. time()
            return float(data["result"][1])
        assert len(data["result"]) <= 1, f"{promql} matches several series: {data['result']}"
        return float(data["result"][0]["value"][1]) if data["result"] else None

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False


@pytest.fixture()
def served(trained_checkpoint, tmp_path):
    """(gRPC target, OpenAI base URL, Prometheus API) for `lmforge serve` scraped by Prometheus."""
    server = subprocess.Popen(
        [sys.executable, "-m", "serve", "serve", "--model", str(trained_checkpoint), "--port", "0", "--http-port", "0",
         "--metrics-port", "0", "--served-model-name", "tiny", "--kv-cache-memory-bytes", str(1 << 20)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    prometheus = None
    try:
        lines = Lines(server)
        grpc_port = lines.until(r"listening on 127\.0\.0\.1:(\d+) \(gRPC").group(1)
        openai_url = lines.until(r"OpenAI API on (http://\S+)").group(1)
        metrics_port = lines.until(r"metrics on http://127\.0\.0\.1:(\d+)/metrics").group(1)
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(ALERTS)],
                  "scrape_configs": [{"job_name": "lmforge",
                                      "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}]}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        prometheus = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                                       f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                                       "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        api = PrometheusApi(f"http://127.0.0.1:{port}")
        wait_until(lambda: prometheus.poll() is None and api.ready(), "Prometheus to start", timeout_s=60)
        lines.until(r"^ready: ")
        yield f"127.0.0.1:{grpc_port}", openai_url, api
    finally:
        for proc in (prometheus, server):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (prometheus, server):
            if proc is not None:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def grpc_stream(target: str, max_tokens: int) -> tuple[int, int]:
    """(generated tokens, prompt tokens) one streaming gRPC client saw."""
    with Client(target, timeout_s=120) as client:
        chunks = list(client.stream("Return the value of", temperature=0, max_tokens=max_tokens, ignore_eos=True))
    return sum(len(c.token_ids) for chunk in chunks for c in chunk.completions), chunks[-1].usage.prompt_tokens


def openai_stream(base_url: str, max_tokens: int) -> tuple[int, int]:
    body = {"model": "tiny", "prompt": "def main", "max_tokens": max_tokens, "ignore_eos": True, "logprobs": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    request = urllib.request.Request(f"{base_url}/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    num_tokens, usage = 0, None
    with urllib.request.urlopen(request, timeout=120) as reply:
        for line in reply:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line.removeprefix(b"data: "))
            for choice in chunk["choices"]:
                num_tokens += len(choice["logprobs"]["tokens"])
            usage = chunk.get("usage") or usage
    assert usage["completion_tokens"] == num_tokens
    return num_tokens, usage["prompt_tokens"]


SERIES = {
    "ttft": 'lmforge:time_to_first_token_seconds_count{model_name="tiny"}',
    "generated": 'lmforge:generation_tokens_total{model_name="tiny"}',
    "prompt": 'lmforge:prompt_tokens_total{model_name="tiny"}',
    "grpc_ok": 'lmforge:grpc_server_handled_total{grpc_method="GenerateStream", grpc_code="OK"}',
    "http_ok": 'lmforge:http_requests_total{handler="/v1/completions", status="200"}',
}


def test_prometheus_sees_exactly_what_the_clients_saw(served):
    target, openai_url, prometheus = served
    wait_until(lambda: prometheus.value('up{job="lmforge"}') == 1.0
               and prometheus.value(SERIES["ttft"]) is not None, "Prometheus to scrape the loaded server")
    before = {name: prometheus.value(promql) or 0.0 for name, promql in SERIES.items()}

    grpc_lengths, http_lengths = [4, 9, 16, 25], [6, 11]
    with ThreadPoolExecutor(len(grpc_lengths) + len(http_lengths)) as pool:
        futures = [pool.submit(grpc_stream, target, n) for n in grpc_lengths]
        futures += [pool.submit(openai_stream, openai_url, n) for n in http_lengths]
        seen = [f.result() for f in futures]
    assert [tokens for tokens, _ in seen] == grpc_lengths + http_lengths

    # Every series was updated before its client saw the end, so a scrape after now holds all of it.
    done_s = prometheus.value("time()")
    wait_until(lambda: (prometheus.value(f"timestamp({SERIES['generated']})") or 0.0) > done_s + 0.5,
               "a scrape after the clients finished")
    after = {name: prometheus.value(promql) or 0.0 for name, promql in SERIES.items()}
    moved = {name: after[name] - before[name] for name in SERIES}
    assert moved == {"ttft": len(seen), "generated": sum(t for t, _ in seen), "prompt": sum(p for _, p in seen),
                     "grpc_ok": len(grpc_lengths), "http_ok": len(http_lengths)}

    rules = json.loads(urllib.request.urlopen(f"{prometheus.url}/api/v1/rules", timeout=10).read())
    (group,) = rules["data"]["groups"]
    assert len(group["rules"]) == 7 and all(rule["health"] == "ok" for rule in group["rules"]
                                            if rule.get("lastEvaluation", "").startswith("2")), group["rules"]

    # The Grafana dashboard's data path (Grafana itself cannot be installed here): every panel's query, with the
    # dashboard's variables as Grafana would substitute them, runs on this Prometheus, and the panels this load
    # touched return data.
    def results(promql: str) -> list:
        return prometheus.query(promql.replace("$model_name", ".*").replace("$__rate_interval", "1m"))["result"]

    # rate() needs two samples in its window: the gRPC series were born with the load, a few scrapes ago
    wait_until(lambda: results("rate(lmforge:grpc_server_handled_total[$__rate_interval])"),
               "two scrapes of the series the load created")
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboard.json").read_text())
    answered = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            answered[panel["title"]] = bool(results(target["expr"])) or answered.get(panel["title"], False)
    touched = {"Time to first token", "Inter-token latency", "End-to-end request latency", "Tokens per second",
               "Finished requests per second", "Running and waiting requests", "gRPC calls per second by status",
               "KV-cache usage", "gRPC p99 latency by method"}
    assert touched <= set(answered) and all(answered[title] for title in touched), \
        {title: has_data for title, has_data in answered.items() if not has_data}
