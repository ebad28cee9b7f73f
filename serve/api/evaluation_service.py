"""The lmforge.v1 Evaluation servicer: parse the task, gather its items (inline, or files inside the data root
only), run the job (serve/evaluation/server_job.py) and stream its events.

Errors: a bad task or record is INVALID_ARGUMENT naming the key or file:line and column; paths outside the
data root are refused with the code serve/evaluation/data_root.py chose (INVALID_ARGUMENT,
PERMISSION_DENIED, NOT_FOUND); naming a file on a server without --data-root is FAILED_PRECONDITION.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from google.protobuf import json_format

from lifecycle.errors import LmforgeError
from serve.api._gen.lmforge.v1 import evaluation_pb2
from serve.api.admission import Refused
from serve.api.services import RequestIds
from serve.backends.base import Backend
from serve.evaluation.data_root import DataRoot, PathRefused
from serve.evaluation.items import EvalItem
from serve.evaluation.results import GenerationAnswer, ItemResult, LoglikelihoodAnswer
from serve.evaluation.server_job import BackendAnswerer, JobProgress, JobResult, run_job
from serve.evaluation.task import BUILTIN_DIR, TaskSpec, parse_task_text
from serve.types import InvalidRequestError

MAX_CONCURRENCY = 64
DEFAULT_CONCURRENCY = 8


class EvaluationService:
    def __init__(self, backend: Backend, data_root: str | Path | None, ids: RequestIds | None = None) -> None:
        self.backend = backend
        self.root = DataRoot(data_root, confined=True)  # with no data root: refuses every file
        self.ids = ids or RequestIds()

    async def Evaluate(self, request: evaluation_pb2.EvaluateRequest, context: grpc.aio.ServicerContext,
                       ) -> AsyncIterator[evaluation_pb2.EvaluateResponse]:
        echoed, internal = self.ids.new(request.request_id, "eval")
        concurrency = request.max_concurrency if request.HasField("max_concurrency") else DEFAULT_CONCURRENCY
        if not 1 <= concurrency <= MAX_CONCURRENCY:
            raise InvalidRequestError("max_concurrency", f"must be in [1, {MAX_CONCURRENCY}], got {concurrency}")
        if request.HasField("limit") and request.limit < 1:
            raise InvalidRequestError("limit", f"must be >= 1, got {request.limit}")
        spec = await asyncio.to_thread(self._spec, request)
        items = await asyncio.to_thread(self._items, spec, request)
        async for event in run_job(spec, items, BackendAnswerer(self.backend, internal), max_concurrency=concurrency):
            if isinstance(event, ItemResult):
                if request.return_items:
                    yield evaluation_pb2.EvaluateResponse(request_id=echoed, item=_item(event))
            elif isinstance(event, JobProgress):
                yield evaluation_pb2.EvaluateResponse(request_id=echoed, progress=evaluation_pb2.EvaluateProgress(
                    num_done=event.num_done, num_total=event.num_total, elapsed_s=event.elapsed_s,
                    metrics=_finite(event.metrics)))
            elif isinstance(event, JobResult):
                result = evaluation_pb2.EvaluateResult(task=event.spec.name, kind=event.spec.kind,
                                                       num_items=event.num_items, metrics=_finite(event.metrics),
                                                       elapsed_s=event.elapsed_s)
                for name, values in event.subjects.items():
                    sub = result.subjects[name]
                    sub.num_items = int(values["num_items"])
                    sub.metrics.update(_finite({k: v for k, v in values.items() if k != "num_items"}))
                yield evaluation_pb2.EvaluateResponse(request_id=echoed, result=result)

    # -- the task and its items (file IO: run in a thread) ---------------------------------------------------
    def _spec(self, request: evaluation_pb2.EvaluateRequest) -> TaskSpec:
        kind = request.WhichOneof("task")
        try:
            if kind == "task_spec":
                return parse_task_text(request.task_spec, "task_spec")
            if kind == "task_file":
                name = request.task_file
                builtin = BUILTIN_DIR / f"{name}.yaml"
                if "/" not in name and "\\" not in name and "." not in name and builtin.is_file():
                    return parse_task_text(builtin.read_text(encoding="utf-8"), f"task_file {name}")
                path = self.root.resolve(name, "task_file")[0]
                return parse_task_text(path.read_text(encoding="utf-8"), f"task_file {name}")
        except PathRefused as err:
            raise Refused(err.code, str(err)) from None
        except (LmforgeError, UnicodeDecodeError) as err:
            raise InvalidRequestError(kind, str(err)) from None
        raise InvalidRequestError("task", "is missing: set task_spec (a task file's text) or task_file")

    def _items(self, spec: TaskSpec, request: evaluation_pb2.EvaluateRequest) -> list[EvalItem]:
        from serve.evaluation.dataset import load_items

        limit = request.limit if request.HasField("limit") else None
        field = "items" if request.items else "data_files" if request.data_files else "task.data"
        try:
            inline = [json_format.MessageToDict(item) for item in request.items] if request.items else None
            return load_items(spec, self.root, limit=limit, inline=inline, data=list(request.data_files) or None)
        except PathRefused as err:
            raise Refused(err.code, str(err)) from None
        except LmforgeError as err:
            raise InvalidRequestError(field, str(err)) from None


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def _item(result: ItemResult) -> evaluation_pb2.EvaluateItem:
    item = evaluation_pb2.EvaluateItem(index=result.item.index, where=result.item.where,
                                       metrics=_finite(result.metrics), subject=result.item.subject or "")
    if isinstance(result.answer, LoglikelihoodAnswer):
        item.logprobs.extend(result.answer.logprobs)
    elif isinstance(result.answer, GenerationAnswer):
        item.text = result.answer.text
    return item
