"""The load generator and its statistics: N closed-loop streaming clients, and what they saw.

`run_level` drives any streaming function (gRPC or the in-process engine: serve/bench_serve/targets.py) with
the same clients, so both sides of the grpc / in-process ratio are measured by the same code: each of N
clients takes the next prompt as soon as its previous request ends, until the level's prompts are used up;
every output token is stamped (perf_counter) when its chunk arrives.

`summarize_level` turns the records into the report's numbers (pure; tested against numpy):
  output_tokens_per_s  all output tokens / wall time of the level (first request sent -> last one ended)
  ttft_ms              request sent -> first output token arrived, over successful requests
  itl_ms               gaps between consecutive tokens of a request, pooled over requests (tokens that arrive
                       in one chunk add gaps of 0, as a streaming client sees them)
  e2e_ms               request sent -> its stream ended
  errors               failed requests by status (a gRPC status name, or the exception's type)
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)

# stream(client_index, prompt_token_ids) -> per chunk: (new output tokens, the server's completion-token count
# when it reports one, else None)
StreamFn = Callable[[int, list[int]], AsyncIterator[tuple[int, int | None]]]


@dataclass
class RequestRecord:
    start_s: float
    end_s: float = 0.0
    stamps_s: list[float] = field(default_factory=list)  # arrival of each output token
    reported_tokens: int | None = None  # the server's own count (gRPC usage.completion_tokens)
    status: str = "OK"
    detail: str = ""


def status_name(err: BaseException) -> str:
    """`RESOURCE_EXHAUSTED` for a gRPC error, else the exception's type (a client-side failure)."""
    code = getattr(err, "code", None)
    if callable(code):
        try:
            return code().name
        except Exception:  # noqa: BLE001 - not a grpc error after all
            pass
    return type(err).__name__


async def one_request(stream: StreamFn, client: int, prompt: list[int]) -> RequestRecord:
    record = RequestRecord(start_s=time.perf_counter())
    try:
        async for num_new, reported in stream(client, prompt):
            now = time.perf_counter()
            record.stamps_s.extend([now] * num_new)
            if reported is not None:
                record.reported_tokens = reported
    except Exception as err:  # noqa: BLE001 - every failure is counted by status, none stops the level
        record.status, record.detail = status_name(err), str(getattr(err, "details", lambda: err)())[:200]
    record.end_s = time.perf_counter()
    return record


async def run_level(stream: StreamFn, prompts: Sequence[list[int]], num_clients: int,
                    on_done: Callable[[], None] = lambda: None) -> tuple[list[RequestRecord], float]:
    """All `prompts` through `num_clients` closed-loop clients; (records in prompt order, wall seconds)."""
    records: list[RequestRecord | None] = [None] * len(prompts)
    work = iter(enumerate(prompts))  # shared: next() never awaits, so clients cannot take the same prompt

    async def client(index: int) -> None:
        for i, prompt in work:
            records[i] = await one_request(stream, index, prompt)
            on_done()

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(min(num_clients, len(prompts)))))
    return records, time.perf_counter() - start  # type: ignore[return-value]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation between order statistics (numpy's default); None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def percentiles_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    out = {}
    for q in PERCENTILES:
        value = percentile(values_s, q)
        out[f"p{q}"] = None if value is None else value * 1e3
    return out


def summarize_level(num_clients: int, records: Sequence[RequestRecord], elapsed_s: float,
                    output_len: int) -> dict[str, Any]:
    """The numbers of one concurrency level (see the module docstring)."""
    ok = [r for r in records if r.status == "OK"]
    errors = Counter(r.status for r in records if r.status != "OK")
    output_tokens = sum(len(r.stamps_s) for r in records)
    reported = [r.reported_tokens for r in ok if r.reported_tokens is not None]
    gaps = [b - a for r in ok for a, b in zip(r.stamps_s, r.stamps_s[1:])]
    ttfts = [r.stamps_s[0] - r.start_s for r in ok if r.stamps_s]
    return {
        "concurrency": num_clients, "num_requests": len(records), "num_ok": len(ok),
        "errors": dict(sorted(errors.items())),
        "error_examples": {status: next(r.detail for r in records if r.status == status) for status in errors},
        # A successful stream that ended with fewer (or more) tokens than asked is a failure of its own kind.
        "num_wrong_length": sum(len(r.stamps_s) != output_len for r in ok),
        "output_tokens": output_tokens, "expected_output_tokens": len(records) * output_len,
        "reported_output_tokens": sum(reported) if reported else None,
        "elapsed_s": elapsed_s,
        "output_tokens_per_s": output_tokens / elapsed_s if elapsed_s > 0 else None,
        "requests_per_s": len(ok) / elapsed_s if elapsed_s > 0 else None,
        "ttft_ms": percentiles_ms(ttfts), "itl_ms": percentiles_ms(gaps),
        "e2e_ms": percentiles_ms([r.end_s - r.start_s for r in ok]),
    }
