"""An evaluation job inside the server: the same items and scorers as `lmforge eval`, answered by the
Backend directly (no network hop), as an async stream of events for the Evaluation service.

    answerer = BackendAnswerer(backend, "eval-7")
    async for event in run_job(spec, items, answerer, max_concurrency=8):
        ...  # JobProgress, ItemResult (each item), then JobResult last

`max_concurrency` workers take items from a queue; the engine batches their requests. Closing the stream
early (the client cancelled) cancels the workers, whose backend calls abort their engine requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from serve.evaluation.items import EvalItem, EvalRequest, GenerationRequest, LoglikelihoodRequest, RollingRequest
from serve.evaluation.results import (Answer, GenerationAnswer, ItemResult, LoglikelihoodAnswer, RollingAnswer,
                                      item_metrics, task_metrics, subject_metrics)
from serve.evaluation.target import MAX_STOP_STRINGS
from serve.evaluation.task import TaskSpec
from serve.scoring import LoglikelihoodQuery
from serve.types import InvalidRequestError, SamplingParams

MAX_PROGRESS_EVENTS = 100  # per job: progress is sent every ~1% of the items (and at the end)


@dataclass(frozen=True)
class JobProgress:
    num_done: int
    num_total: int
    elapsed_s: float
    metrics: dict[str, float]


@dataclass(frozen=True)
class JobResult:
    spec: TaskSpec
    num_items: int
    metrics: dict[str, float]
    elapsed_s: float
    subjects: dict[str, dict[str, float]] = field(default_factory=dict)  # per subject: num_items and metrics


class BackendAnswerer:
    """EvalRequests answered by a Backend (serve/backends/base.py) on the server's event loop."""

    def __init__(self, backend: Any, request_id: str) -> None:
        self.backend = backend
        self.request_id = request_id

    async def answer(self, item: EvalItem) -> Answer:
        rid = f"{self.request_id}/{item.index}"
        request: EvalRequest = item.request
        if isinstance(request, LoglikelihoodRequest):
            result = await self.backend.score(rid, [LoglikelihoodQuery(request.context, request.continuations)], [])
            scores = result.loglikelihood[0]
            return LoglikelihoodAnswer(tuple(s.logprob for s in scores), tuple(s.is_greedy for s in scores),
                                       tuple(s.num_tokens for s in scores))
        if isinstance(request, RollingRequest):
            score = (await self.backend.score(rid, [], [request.text])).rolling[0]
            return RollingAnswer(score.logprob, score.num_tokens)
        if isinstance(request, GenerationRequest):
            prompt_ids = self.backend.tokenize(request.prompt)
            max_model_len = self.backend.model_info().max_model_len
            if len(prompt_ids) >= max_model_len:
                raise InvalidRequestError("prompt", f"has {len(prompt_ids)} tokens; the served context is "
                                                    f"{max_model_len}: shorten the prompt (fewer few-shot examples)")
            params = SamplingParams(temperature=0.0, max_tokens=request.max_tokens,
                                    stop=tuple(request.until[:MAX_STOP_STRINGS]))
            parts = []
            stream = self.backend.generate(rid, prompt_ids, params)
            async with contextlib.aclosing(stream):
                async for out in stream:
                    parts.extend(c.text for c in out.outputs)
            return GenerationAnswer("".join(parts))
        raise TypeError(f"unknown request {type(request).__name__}")


async def run_job(spec: TaskSpec, items: Sequence[EvalItem], answerer: BackendAnswerer, *,
                  max_concurrency: int = 8) -> AsyncIterator[JobProgress | ItemResult | JobResult]:
    started = time.perf_counter()
    queue: asyncio.Queue[EvalItem] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    finished: asyncio.Queue[ItemResult | BaseException] = asyncio.Queue()

    async def worker() -> None:
        while True:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                answer = await answerer.answer(item)
            except InvalidRequestError as err:  # one item the model cannot take: say which
                await finished.put(InvalidRequestError(f"{item.where}", f"{err}"))
                return
            except Exception as err:  # noqa: BLE001 - handed to the stream, which raises it
                await finished.put(err)
                return
            await finished.put(ItemResult(item, answer, item_metrics(spec, item, answer)))

    workers = [asyncio.create_task(worker()) for _ in range(max(1, min(max_concurrency, len(items))))]
    results: list[ItemResult] = []
    every = max(1, len(items) // MAX_PROGRESS_EVENTS)
    try:
        while len(results) < len(items):
            got = await finished.get()
            if isinstance(got, BaseException):
                raise got
            results.append(got)
            yield got
            if len(results) % every == 0 or len(results) == len(items):
                yield JobProgress(len(results), len(items), time.perf_counter() - started,
                                  task_metrics(spec, results))
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    yield JobResult(spec, len(results), task_metrics(spec, results), time.perf_counter() - started,
                    subject_metrics(spec, results))
