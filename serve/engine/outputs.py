"""Folding a request's streamed deltas (`RequestOutput`s) into whole completions, for offline callers."""

from __future__ import annotations

from serve.types import CompletionOutput, RequestOutput


def empty_output(request_id: str) -> RequestOutput:
    """A request that ended (aborted) before producing anything."""
    return RequestOutput(request_id=request_id, outputs=(), finished=True, num_prompt_tokens=0)


def merge_outputs(deltas: list[RequestOutput]) -> RequestOutput:
    """Fold a request's streamed deltas into one RequestOutput holding each completion in full."""
    last = deltas[-1]
    by_index: dict[int, list[CompletionOutput]] = {}
    for ro in deltas:
        for c in ro.outputs:
            by_index.setdefault(c.index, []).append(c)
    outputs = [concat_completions(by_index[index]) for index in sorted(by_index)]
    prompt_logprobs = next((ro.prompt_logprobs for ro in deltas if ro.prompt_logprobs is not None), None)
    return RequestOutput(request_id=last.request_id, outputs=tuple(outputs), finished=last.finished,
                         num_prompt_tokens=last.num_prompt_tokens, num_cached_tokens=last.num_cached_tokens,
                         prompt_logprobs=prompt_logprobs, queue_s=last.queue_s, ttft_s=last.ttft_s, e2e_s=last.e2e_s)


def concat_completions(parts: list[CompletionOutput]) -> CompletionOutput:
    """Consecutive deltas of one completion as one delta."""
    logprobs = None
    if any(p.logprobs is not None for p in parts):
        logprobs = tuple(lp for p in parts for lp in (p.logprobs or ()))
    return CompletionOutput(index=parts[0].index, token_ids=tuple(t for p in parts for t in p.token_ids),
                            text="".join(p.text for p in parts), logprobs=logprobs,
                            finish_reason=parts[-1].finish_reason, stop_reason=parts[-1].stop_reason)
