"""The Prometheus registry of one server: engine series fed by the Backend, API series fed by the servers.

Names, labels and bucket boundaries follow vLLM's (vllm/v1/metrics/loggers.py, `PrometheusStatLogger`):
every spec below marked `vllm=True` is vLLM's `vllm:<name>` as `lmforge:<name>`, same type, buckets and
`model_name` label (not vLLM's `engine` index: one engine here), so a vLLM dashboard carries over by
replacing the prefix; `vllm_names=True` (`lmforge serve
--metrics-vllm-names`) also exposes the `vllm:` names themselves. docs/METRICS.md documents every series
(a test keeps the two in step). The registry is the server's own, never prometheus_client's global one.

    metrics = ServerMetrics()                              # API series (gRPC, HTTP) exist at once
    metrics.attach(backend, model_name, max_model_len)     # after backend.start(): engine series; the
                                                           # backend hands over every step's EngineStats
    metrics.observe_rpc(...) / metrics.observe_http(...)   # from the servers' handler wrappers
    metrics.exposition()                                   # text format 0.0.4, for GET /metrics

Engine series come from `EngineStats` (serve/types.py): gauges are set, cumulative counters incremented
by their difference from the previous snapshot, and each `FinishedRequestStats` observed once in the
latency histograms (see `request_timings`). Histograms are observed when a request finishes, so a
request's time to first token shows up then, not at its first token (vLLM observes it per step).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Metric, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from serve.types import EngineStats, FinishedRequestStats, FinishReason

log = logging.getLogger(__name__)

PREFIX = "lmforge:"
VLLM_PREFIX = "vllm:"
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what Prometheus 2.x scrapes; prometheus_client's "latest" is newer

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py), copied so the twins stay comparable.
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                  20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                           10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                             120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

# vLLM's finished_reason label values (vllm/v1/engine FINISH_REASON_STRINGS): a stop string is "stop" there.
FINISHED_REASON_LABELS = {FinishReason.STOP: "stop", FinishReason.STOP_STRING: "stop", FinishReason.LENGTH: "length",
                          FinishReason.ABORT: "abort", FinishReason.ERROR: "error"}

Kind = Literal["counter", "gauge", "histogram"]


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value: vLLM's buckets for per-request token counts."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(buckets)
            buckets.append(mantissa * scale)
        scale *= 10


@dataclass(frozen=True)
class MetricSpec:
    """One series family. `name` is the exposed name without the prefix (counters end in `_total`);
    `buckets` None on a histogram means vLLM's 1-2-5 token buckets up to the model's context."""

    name: str
    kind: Kind
    unit: str
    labels: tuple[str, ...]
    help: str
    buckets: tuple[float, ...] | None = None
    vllm: bool = False  # vLLM exposes vllm:<name> with the same type, buckets and model_name label
    engine: bool = True  # fed from EngineStats (created by attach()); False: by the API servers

    @property
    def full_name(self) -> str:
        return PREFIX + self.name


M = ("model_name",)
GRPC = ("grpc_service", "grpc_method", "grpc_type")
HTTP = ("handler", "method")

SPECS: tuple[MetricSpec, ...] = (
    # -- scheduler state
    MetricSpec("num_requests_running", "gauge", "requests", M, "Requests in the engine's running batch.", vllm=True),
    MetricSpec("num_requests_waiting", "gauge", "requests", M, "Requests waiting to be scheduled.", vllm=True),
    MetricSpec("kv_cache_usage_perc", "gauge", "fraction", M, "KV-cache blocks in use; 1 means 100 percent.",
               vllm=True),
    # -- counters
    MetricSpec("prompt_tokens_total", "counter", "tokens", M, "Prompt tokens of requests that reached their first "
               "token (prefix-cache hits included).", vllm=True),
    MetricSpec("generation_tokens_total", "counter", "tokens", M, "Generated tokens.", vllm=True),
    MetricSpec("request_success_total", "counter", "requests", (*M, "finished_reason"), "Finished requests by "
               "reason: stop (EOS, stop token or stop string), length, abort, error.", vllm=True),
    MetricSpec("num_preemptions_total", "counter", "preemptions", M, "Sequences preempted (KV blocks freed, "
               "recomputed later).", vllm=True),
    MetricSpec("prefix_cache_queries_total", "counter", "tokens", M, "Prompt tokens looked up in the prefix cache.",
               vllm=True),
    MetricSpec("prefix_cache_hits_total", "counter", "tokens", M, "Prompt tokens found in the prefix cache.",
               vllm=True),
    MetricSpec("spec_decode_num_draft_tokens_total", "counter", "tokens", M, "Speculative draft tokens verified.",
               vllm=True),
    MetricSpec("spec_decode_num_accepted_tokens_total", "counter", "tokens", M, "Speculative draft tokens "
               "accepted.", vllm=True),
    # -- per-request histograms
    MetricSpec("time_to_first_token_seconds", "histogram", "seconds", M, "Arrival to first generated token.",
               TTFT_BUCKETS_S, vllm=True),
    MetricSpec("inter_token_latency_seconds", "histogram", "seconds", M, "Gap between successive generated "
               "tokens (one observation per gap).", TOKEN_LATENCY_BUCKETS_S, vllm=True),
    MetricSpec("request_time_per_output_token_seconds", "histogram", "seconds", M, "Per request: decode time / "
               "(generated tokens - 1); requests of one token are not observed.", TOKEN_LATENCY_BUCKETS_S, vllm=True),
    MetricSpec("e2e_request_latency_seconds", "histogram", "seconds", M, "Arrival to finish.",
               REQUEST_LATENCY_BUCKETS_S, vllm=True),
    MetricSpec("request_queue_time_seconds", "histogram", "seconds", M, "Arrival to first scheduled (waiting).",
               REQUEST_LATENCY_BUCKETS_S, vllm=True),
    MetricSpec("request_inference_time_seconds", "histogram", "seconds", M, "First scheduled to last token "
               "(prefill + decode).", REQUEST_LATENCY_BUCKETS_S, vllm=True),
    MetricSpec("request_prefill_time_seconds", "histogram", "seconds", M, "First scheduled to first token.",
               REQUEST_LATENCY_BUCKETS_S, vllm=True),
    MetricSpec("request_decode_time_seconds", "histogram", "seconds", M, "First token to last token.",
               REQUEST_LATENCY_BUCKETS_S, vllm=True),
    MetricSpec("request_prompt_tokens", "histogram", "tokens", M, "Prompt length per finished request.", vllm=True),
    MetricSpec("request_generation_tokens", "histogram", "tokens", M, "Generated tokens per finished request.",
               vllm=True),
    # -- API
    MetricSpec("grpc_server_handled_total", "counter", "rpcs", (*GRPC, "grpc_code"), "gRPC calls completed, by "
               "status code (grpc_type: unary or server_stream).", engine=False),
    MetricSpec("grpc_server_handling_seconds", "histogram", "seconds", GRPC, "gRPC call duration, to the last "
               "streamed message.", REQUEST_LATENCY_BUCKETS_S, engine=False),
    MetricSpec("http_requests_total", "counter", "requests", (*HTTP, "status"), "HTTP requests completed (OpenAI "
               "API), by route, method and status code.", engine=False),
    MetricSpec("http_request_duration_seconds", "histogram", "seconds", HTTP, "HTTP request duration, to the end "
               "of a streamed response.", REQUEST_LATENCY_BUCKETS_S, engine=False),
)
SPECS_BY_NAME = {spec.full_name: spec for spec in SPECS}

# EngineStats' cumulative fields -> the counter each feeds.
_CUMULATIVE = {
    "num_prompt_tokens_total": "prompt_tokens_total",
    "num_generation_tokens_total": "generation_tokens_total",
    "num_preemptions_total": "num_preemptions_total",
    "prefix_cache_queries_tokens": "prefix_cache_queries_total",
    "prefix_cache_hits_tokens": "prefix_cache_hits_total",
    "spec_draft_tokens_total": "spec_decode_num_draft_tokens_total",
    "spec_accepted_tokens_total": "spec_decode_num_accepted_tokens_total",
}


@dataclass(frozen=True)
class RequestTimings:
    """vLLM's per-request intervals (vllm/v1/metrics/stats.py) from our FinishedRequestStats; None where
    the request never got there (aborted while waiting, or before its first token)."""

    e2e_s: float
    queue_s: float | None
    prefill_s: float | None
    decode_s: float | None
    inference_s: float | None
    time_per_output_token_s: float | None


def request_timings(f: FinishedRequestStats) -> RequestTimings:
    """queue = arrival -> first scheduled; prefill = first scheduled -> first token (ttft - queue);
    decode = first -> last token (the sum of the inter-token gaps); inference = prefill + decode;
    time per output token = decode / (generated - 1)."""
    prefill_s = decode_s = inference_s = tpot_s = None
    if f.ttft_s is not None and f.queue_s is not None:
        prefill_s = max(0.0, f.ttft_s - f.queue_s)
        decode_s = float(sum(f.itl_s))
        inference_s = prefill_s + decode_s
        if f.num_generation_tokens > 1:
            tpot_s = decode_s / (f.num_generation_tokens - 1)
    return RequestTimings(e2e_s=f.e2e_s, queue_s=f.queue_s, prefill_s=prefill_s, decode_s=decode_s,
                          inference_s=inference_s, time_per_output_token_s=tpot_s)


class ServerMetrics:
    """The registry and the code that feeds it. `on_stats` runs on the engine's thread, the observe_*
    methods and `exposition` on the server's event loop; prometheus_client's series are thread-safe and
    the counter bookkeeping (`_last`) is touched by the engine thread only."""

    def __init__(self, *, vllm_names: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.vllm_names = vllm_names
        self.model_name: str | None = None
        self._families: dict[str, Any] = {}
        self._bound: dict[str, Any] = {}  # engine series bound to this model's label
        self._last = EngineStats()
        self._lock = threading.Lock()
        for spec in SPECS:
            if not spec.engine:
                self._families[spec.name] = _family(spec, self.registry, None)

    # ------------------------------------------------------------------------------ engine
    def attach(self, backend: Any, model_name: str, max_model_len: int) -> None:
        """Create the engine series for `model_name` and subscribe to the backend's stats (call once,
        after backend.start())."""
        with self._lock:
            if self.model_name is not None:
                raise RuntimeError(f"metrics already attached to {self.model_name!r}")
            self.model_name = model_name
            for spec in SPECS:
                if spec.engine:
                    family = self._families[spec.name] = _family(spec, self.registry, max_model_len)
                    if "finished_reason" not in spec.labels:
                        self._bound[spec.name] = family.labels(model_name)
            success = self._families["request_success_total"]
            for reason in sorted(set(FINISHED_REASON_LABELS.values())):  # every reason shows, at 0
                success.labels(model_name, reason)
        backend.add_stats_listener(self.on_stats)

    def on_stats(self, stats: EngineStats) -> None:
        """One engine step's snapshot (see the module docstring)."""
        bound = self._bound
        bound["num_requests_running"].set(stats.num_running)
        bound["num_requests_waiting"].set(stats.num_waiting)
        bound["kv_cache_usage_perc"].set(stats.kv_cache_usage)
        for field, name in _CUMULATIVE.items():
            increase = getattr(stats, field) - getattr(self._last, field)
            if increase > 0:
                bound[name].inc(increase)
        self._last = stats
        for finished in stats.finished_requests:
            self._observe_finished(finished)

    def _observe_finished(self, f: FinishedRequestStats) -> None:
        bound = self._bound
        self._families["request_success_total"].labels(self.model_name, FINISHED_REASON_LABELS[f.finish_reason]).inc()
        t = request_timings(f)
        for name, value in (("e2e_request_latency_seconds", t.e2e_s), ("request_queue_time_seconds", t.queue_s),
                            ("time_to_first_token_seconds", f.ttft_s), ("request_prefill_time_seconds", t.prefill_s),
                            ("request_decode_time_seconds", t.decode_s),
                            ("request_inference_time_seconds", t.inference_s),
                            ("request_time_per_output_token_seconds", t.time_per_output_token_s)):
            if value is not None:
                bound[name].observe(value)
        itl = bound["inter_token_latency_seconds"]
        for gap_s in f.itl_s:
            itl.observe(gap_s)
        bound["request_prompt_tokens"].observe(f.num_prompt_tokens)
        bound["request_generation_tokens"].observe(f.num_generation_tokens)

    # ------------------------------------------------------------------------------ API
    def observe_rpc(self, service: str, method: str, grpc_type: str, code: str, duration_s: float) -> None:
        """One finished gRPC call (serve/api/handlers.py's RpcObserver)."""
        self._families["grpc_server_handled_total"].labels(service, method, grpc_type, code).inc()
        self._families["grpc_server_handling_seconds"].labels(service, method, grpc_type).observe(duration_s)

    def observe_http(self, handler: str, method: str, status: int, duration_s: float) -> None:
        self._families["http_requests_total"].labels(handler, method, str(status)).inc()
        self._families["http_request_duration_seconds"].labels(handler, method).observe(duration_s)

    # ------------------------------------------------------------------------------ exposition
    def exposition(self) -> bytes:
        text = generate_latest(self.registry)
        if self.vllm_names:
            aliases = CollectorRegistry(auto_describe=False)
            aliases.register(_VllmNames(self.registry))
            text += generate_latest(aliases)
        return text


def _family(spec: MetricSpec, registry: CollectorRegistry, max_model_len: int | None) -> Any:
    kwargs: dict[str, Any] = dict(name=spec.full_name, documentation=spec.help, labelnames=spec.labels,
                                  registry=registry)
    if spec.kind == "counter":
        return Counter(**kwargs)  # prometheus_client strips "_total" from the family name and adds it back
    if spec.kind == "gauge":
        return Gauge(**kwargs)
    buckets = spec.buckets if spec.buckets is not None else build_1_2_5_buckets(max_model_len or 1)
    return Histogram(buckets=buckets, **kwargs)


class _VllmNames:
    """A collector that re-emits the vLLM-twin families of `source` under the `vllm:` prefix."""

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source
        self.families = {spec.full_name.removesuffix("_total") for spec in SPECS if spec.vllm}

    def collect(self) -> Iterable[Metric]:
        for family in self.source.collect():
            if family.name not in self.families:
                continue
            twin = Metric(VLLM_PREFIX + family.name.removeprefix(PREFIX), family.documentation, family.type,
                          family.unit)
            twin.samples = [s._replace(name=VLLM_PREFIX + s.name.removeprefix(PREFIX)) for s in family.samples]
            yield twin


def exposed_series_names(specs: Sequence[MetricSpec] = SPECS) -> set[str]:
    """Every sample name the registry can expose (histograms' _bucket/_sum/_count, counters' _total):
    what PromQL in deploy/ may refer to."""
    names = set()
    for spec in specs:
        if spec.kind == "histogram":
            names.update(spec.full_name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(spec.full_name)
    return names

