"""vLLM's per-step and per-request stats -> our EngineStats, so the `lmforge:` series (serve/metrics.py) are fed
the same way whichever backend runs.

vLLM hands a stat logger (vllm/v1/metrics/loggers.py `StatLoggerBase`) two objects after every engine step, on
the AsyncLLM's output handler, i.e. on our event loop: `SchedulerStats` (gauges; prefix-cache and spec-decode
counts of that step) and `IterationStats` (tokens of that step, time to first token and inter-token gaps of
the step without request ids, and `FinishedRequestStats` of the requests that finished in it).

    ours (EngineStats)              vLLM
    num_running / num_waiting       SchedulerStats.num_running_reqs / num_waiting_reqs (+ num_skipped_waiting_reqs)
    kv_cache_usage                  SchedulerStats.kv_cache_usage
    num_prompt_tokens_total         sum of IterationStats.prompt_token_stats.total (requests reaching a first token)
    num_generation_tokens_total     sum of IterationStats.num_generation_tokens
    num_preemptions_total           sum of IterationStats.num_preempted_reqs
    prefix_cache_queries/hits       sum of SchedulerStats.prefix_cache_stats.queries / hits (reset every step)
    spec_draft/accepted_tokens      sum of SchedulerStats.spec_decoding_stats.num_draft_tokens / num_accepted_tokens
    finished_requests               IterationStats.finished_requests, one per request (one per completion, n > 1)
      queue_s                         queued_time (engine core: queued -> first scheduled)
      ttft_s                          RequestStateStats.first_token_latency (arrival -> first token)
      itl_s                           per-request gaps between successive token steps (below)
      e2e_s                           e2e_latency

Our FinishedRequestStats keeps each request's own inter-token gaps; vLLM's IterationStats has them only
pooled per step. They are the differences of vLLM's `RequestStateStats.last_token_ts` (engine-core
timestamps, as vLLM's inter_token_latency), read here from the output processor's live request states after
every step, the same points in time vLLM measures. A request vLLM aborts for a client (our generate() closed
early) gets no FinishedRequestStats from vLLM (its output processor drops the state): `aborted()` makes the
one our native engine would make, finish reason ABORT.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from serve.backends.vllm_params import finish_reason
from serve.types import EngineStats, FinishedRequestStats, FinishReason

log = logging.getLogger(__name__)


@dataclass
class _Clock:
    """One running request (one completion of n) as seen after each step."""

    external_id: str
    num_prompt_tokens: int
    stats: Any  # vLLM's RequestStateStats: the live object, still readable after vLLM drops the request
    last_token_ts: float | None = None
    itl_s: list[float] = field(default_factory=list)

    def observe(self) -> None:
        ts = self.stats.last_token_ts
        if self.stats.num_generation_tokens == 0 or ts == self.last_token_ts:
            return
        if self.last_token_ts is not None:
            self.itl_s.append(ts - self.last_token_ts)
        self.last_token_ts = ts


class StatsBridge:
    """Accumulates vLLM's stats into EngineStats and hands each step's snapshot to `publish`."""

    def __init__(self, publish: Callable[[EngineStats], None]) -> None:
        self._publish = publish
        self._request_states: dict[str, Any] = {}  # the AsyncLLM output processor's, by internal request id
        self._clocks: dict[str, _Clock] = {}
        self.latest = EngineStats()

    def watch(self, request_states: dict[str, Any]) -> None:
        """Read per-request timings from this dict (vLLM's OutputProcessor.request_states) after every step."""
        self._request_states = request_states

    def logger_factory(self) -> Callable[..., Any]:
        """A vLLM stat logger factory (AsyncLLM(stat_loggers=[...])) that forwards to `record`."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        bridge = self

        class _Forward(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                self.engine_index = engine_index

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
                try:
                    bridge.record(scheduler_stats, iteration_stats)
                except Exception:  # noqa: BLE001 - a metrics bug must not kill vLLM's output handler
                    log.exception("translating vLLM's stats failed")

            def log_engine_initialized(self) -> None:
                pass

        return _Forward

    # ------------------------------------------------------------------------------ per step
    def record(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        stats = dataclasses.replace(self.latest, finished_requests=[])
        if scheduler_stats is not None:
            stats.num_running = scheduler_stats.num_running_reqs
            stats.num_waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
            stats.kv_cache_usage = float(scheduler_stats.kv_cache_usage)
            prefix = scheduler_stats.prefix_cache_stats
            if prefix is not None:
                stats.prefix_cache_queries_tokens += prefix.queries
                stats.prefix_cache_hits_tokens += prefix.hits
            spec = scheduler_stats.spec_decoding_stats
            if spec is not None:
                stats.spec_draft_tokens_total += spec.num_draft_tokens
                stats.spec_accepted_tokens_total += spec.num_accepted_tokens
        self._observe_running()
        if iteration_stats is not None:
            stats.num_prompt_tokens_total += iteration_stats.prompt_token_stats.total
            stats.num_generation_tokens_total += iteration_stats.num_generation_tokens
            stats.num_preemptions_total += iteration_stats.num_preempted_reqs
            stats.finished_requests = [self._finished(f) for f in iteration_stats.finished_requests]
        self._emit(stats)

    def _observe_running(self) -> None:
        for internal_id, state in list(self._request_states.items()):
            clock = self._clocks.get(internal_id)
            if clock is None:
                clock = self._clocks[internal_id] = _Clock(state.external_req_id, state.prompt_len, state.stats)
            clock.observe()

    def _take_clock(self, external_id: str) -> _Clock | None:
        """The clock of a finished request: one with this external id that vLLM no longer runs."""
        for internal_id, clock in self._clocks.items():
            if clock.external_id == external_id and internal_id not in self._request_states:
                return self._clocks.pop(internal_id)
        return None

    def _finished(self, f: Any) -> FinishedRequestStats:
        clock = self._take_clock(f.request_id)
        if clock is not None:
            clock.observe()  # the last step's gap: vLLM dropped the request before this record()
            ttft_s = clock.stats.first_token_latency if clock.stats.num_generation_tokens else None
            itl_s = tuple(clock.itl_s)
        else:  # added and finished within one step: nothing was ever between two tokens
            ttft_s = f.e2e_latency - f.decode_time if f.num_generation_tokens else None
            itl_s = ()
        return FinishedRequestStats(
            request_id=f.request_id, finish_reason=finish_reason(str(f.finish_reason), None),
            num_prompt_tokens=f.num_prompt_tokens, num_generation_tokens=f.num_generation_tokens,
            queue_s=max(0.0, f.queued_time), ttft_s=ttft_s, itl_s=itl_s, e2e_s=f.e2e_latency)

    # ------------------------------------------------------------------------------ client aborts
    def aborted(self, external_id: str, num_prompt_tokens: int, arrival_time: float) -> None:
        """The backend aborted `external_id` for its client (call before vLLM's abort drops its state):
        publish an ABORT FinishedRequestStats per completion, as the native engine does."""
        finished = []
        for internal_id in [i for i, c in self._clocks.items() if c.external_id == external_id]:
            clock = self._clocks.pop(internal_id)
            clock.observe()
            s = clock.stats
            finished.append(FinishedRequestStats(
                request_id=external_id, finish_reason=FinishReason.ABORT, num_prompt_tokens=clock.num_prompt_tokens,
                num_generation_tokens=s.num_generation_tokens,
                queue_s=max(0.0, s.scheduled_ts - s.queued_ts) if s.scheduled_ts else None,
                ttft_s=s.first_token_latency if s.num_generation_tokens else None, itl_s=tuple(clock.itl_s),
                e2e_s=time.time() - s.arrival_time))
        if not finished:  # never seen after a step: aborted before vLLM computed anything for it
            finished.append(FinishedRequestStats(
                request_id=external_id, finish_reason=FinishReason.ABORT, num_prompt_tokens=num_prompt_tokens,
                num_generation_tokens=0, queue_s=None, ttft_s=None, itl_s=(), e2e_s=time.time() - arrival_time))
        self._emit(dataclasses.replace(self.latest, finished_requests=finished))

    def _emit(self, stats: EngineStats) -> None:
        self.latest = stats
        self._publish(stats)
