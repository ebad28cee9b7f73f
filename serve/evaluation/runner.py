"""Running a task against a target: bounded concurrency, retries, a progress bar, resume from the cache.

Items are answered by at most `concurrency` threads at once (each holds one request to the server, which
batches them). Each finished item goes to the ResultCache before it counts as done, so a killed run
loses only the items in flight. The first item that fails for good (after retries) cancels the rest and
raises, naming the item's data file and line.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from lifecycle.errors import LmforgeError
from serve.evaluation.cache import ResultCache, run_key
from serve.evaluation.items import EvalItem
from serve.evaluation.results import ItemResult, item_metrics, subject_metrics, task_metrics
from serve.evaluation.retry import RetryPolicy, call_with_retries
from serve.evaluation.target import EvalTarget, TargetError, TransientError
from serve.evaluation.task import TaskSpec


class EvalRunError(LmforgeError):
    """An item failed for good; finished items are in the cache, so rerunning resumes."""


@dataclass
class TaskRun:
    spec: TaskSpec
    results: list[ItemResult]
    metrics: dict[str, float]
    num_cached: int  # items taken from the cache
    num_requested: int  # items asked of the target in this run
    num_retries: int
    elapsed_s: float
    run_key: str = ""
    failures: list[str] = field(default_factory=list)
    subjects: dict[str, dict[str, float]] = field(default_factory=dict)  # per subject: num_items and metrics


def run_task(spec: TaskSpec, items: Sequence[EvalItem], target: EvalTarget, *, cache: ResultCache | None = None,
             concurrency: int = 8, retry: RetryPolicy = RetryPolicy(), progress: bool = True) -> TaskRun:
    started = time.perf_counter()
    key = run_key(spec, target.describe())
    done = cache.load(key, spec, items) if cache is not None else {}
    todo = [item for item in items if item.index not in done]
    retries = [0]
    lock = threading.Lock()

    def on_retry(attempt: int, err: TransientError) -> None:
        with lock:
            retries[0] += 1

    def answer(item: EvalItem) -> ItemResult:
        result = call_with_retries(lambda: target.answer(item.request), retry, on_retry=on_retry)
        return ItemResult(item, result, item_metrics(spec, item, result))

    bar = _progress_bar(spec.name, len(items), len(done), progress)
    results = dict(done)
    try:
        with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix=f"eval-{spec.name}") as pool:
            pending: dict[Future, EvalItem] = {}
            queue = iter(todo)
            # Submit at most `concurrency` at a time: a failure then cancels little, and memory stays flat.
            for item in queue:
                pending[pool.submit(answer, item)] = item
                if len(pending) >= concurrency:
                    break
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    item = pending.pop(future)
                    try:
                        result = future.result()
                    except (TransientError, TargetError) as err:
                        for other in pending:
                            other.cancel()
                        raise EvalRunError(f"{spec.name}: {item.where} (item {item.index}): {err}"
                                           + (f"; {len(results)} finished items are cached in {cache.path}: rerun "
                                              "to resume" if cache is not None else "")) from None
                    results[item.index] = result
                    if cache is not None:
                        cache.append(key, result)
                    bar.update(1)
                    nxt = next(queue, None)
                    if nxt is not None:
                        pending[pool.submit(answer, nxt)] = nxt
    finally:
        bar.close()
    ordered = [results[item.index] for item in items]
    return TaskRun(spec, ordered, task_metrics(spec, ordered), num_cached=len(done), num_requested=len(todo),
                   num_retries=retries[0], elapsed_s=time.perf_counter() - started, run_key=key,
                   subjects=subject_metrics(spec, ordered))


def _progress_bar(name: str, total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=name, unit="item", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, leave=False)
