"""StatsBridge: vLLM's per-step stats -> EngineStats (unit tests of the translation with stand-in stats objects;
the end-to-end check against a real vLLM engine is tests/serve/backend_suite/test_metrics_parity.py)."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from serve.backends.vllm_stats import StatsBridge
from serve.types import FinishReason


def _scheduler(running=1, waiting=0, usage=0.25, queries=0, hits=0, drafts=None):
    spec = None if drafts is None else NS(num_draft_tokens=drafts[0], num_accepted_tokens=drafts[1])
    return NS(num_running_reqs=running, num_waiting_reqs=waiting, num_skipped_waiting_reqs=0, kv_cache_usage=usage,
              prefix_cache_stats=NS(queries=queries, hits=hits), spec_decoding_stats=spec)


def _iteration(prompt=0, generated=0, finished=()):
    return NS(prompt_token_stats=NS(total=prompt), num_generation_tokens=generated, num_preempted_reqs=0,
              finished_requests=list(finished))


def _request_stats(n, first_ts, last_ts):
    return NS(num_generation_tokens=n, first_token_ts=first_ts, last_token_ts=last_ts, first_token_latency=0.5,
              arrival_time=100.0, queued_ts=1.0, scheduled_ts=1.25)


def test_counters_accumulate_and_each_request_keeps_its_own_gaps():
    published = []
    bridge = StatsBridge(published.append)
    states = {}
    bridge.watch(states)
    a = _request_stats(1, 10.0, 10.0)
    states["a-internal"] = NS(external_req_id="a", prompt_len=5, stats=a)
    bridge.record(_scheduler(queries=5, drafts=(4, 3)), _iteration(prompt=5, generated=1))
    a.num_generation_tokens, a.last_token_ts = 2, 10.5  # step 2: one more token
    bridge.record(_scheduler(queries=0, drafts=(4, 1)), _iteration(generated=1))
    a.num_generation_tokens, a.last_token_ts = 3, 11.25  # step 3: the last token; vLLM drops the request
    del states["a-internal"]
    done = NS(request_id="a", finish_reason="length", num_prompt_tokens=5, num_generation_tokens=3,
              queued_time=0.25, e2e_latency=2.0, decode_time=1.25)
    bridge.record(_scheduler(running=0, usage=0.0), _iteration(generated=1, finished=[done]))
    last = published[-1]
    assert (last.num_prompt_tokens_total, last.num_generation_tokens_total) == (5, 3)
    assert (last.prefix_cache_queries_tokens, last.spec_draft_tokens_total, last.spec_accepted_tokens_total) == (5, 8, 4)
    assert (last.num_running, last.kv_cache_usage) == (0, 0.0)
    (f,) = last.finished_requests
    assert f.finish_reason is FinishReason.LENGTH and f.itl_s == pytest.approx((0.5, 0.75))
    assert (f.ttft_s, f.queue_s, f.e2e_s) == (0.5, 0.25, 2.0)
    assert published[-2].finished_requests == []  # each finished request in exactly one snapshot


def test_a_request_finished_within_one_step_has_no_gaps():
    published = []
    bridge = StatsBridge(published.append)
    done = NS(request_id="s", finish_reason="length", num_prompt_tokens=9, num_generation_tokens=1, queued_time=0.0,
              e2e_latency=0.3, decode_time=0.0)
    bridge.record(_scheduler(running=0), _iteration(prompt=9, generated=1, finished=[done]))
    (f,) = published[-1].finished_requests
    assert f.itl_s == () and f.ttft_s == 0.3


def test_a_client_abort_is_published_as_abort():
    published = []
    bridge = StatsBridge(published.append)
    states = {"x-internal": NS(external_req_id="x", prompt_len=4, stats=_request_stats(2, 10.0, 10.5))}
    bridge.watch(states)
    bridge.record(_scheduler(), _iteration(generated=2))
    bridge.aborted("x", 4, arrival_time=100.0)
    (f,) = published[-1].finished_requests
    assert (f.finish_reason, f.num_generation_tokens, f.num_prompt_tokens, f.queue_s) == (FinishReason.ABORT, 2, 4, 0.25)
    bridge.aborted("never-seen", 7, arrival_time=100.0)  # aborted before any step: still counted, no timings
    (g,) = published[-1].finished_requests
    assert (g.finish_reason, g.num_generation_tokens, g.ttft_s, g.queue_s) == (FinishReason.ABORT, 0, None, None)
