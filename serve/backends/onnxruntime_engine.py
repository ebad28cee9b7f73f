"""OrtEngine: the step loop of lmforge's engine (add_request / step / abort) over an ONNX export, so that
serve/engine/async_engine.py runs it unchanged (its thread, streaming, cancellation, stats listeners).

Forward passes and KV caches are a runner's (serve/backends/onnxruntime_runners.py): `batched` (default; plain
onnxruntime, every running sequence's decode in one call, caches left-padded: continuous batching) or `genai`
(one onnxruntime-genai Generator per sequence, decoded one after the other). Sampling is ours: each step the
last-position logits of every running sequence are stacked and go through serve/worker/sampler.py's
`sample_batch`, the native engine's sampler, so greedy, temperature / top-k / top-p / min-p, penalties, seeds,
min_tokens and logprobs mean the same here. EOS, stop ids, stop strings and max_tokens are decided here too (the
genai model is opened with no EOS id).

Why not onnxruntime-genai's own continuous batching: 0.18's `og.Engine` feeds a right-padded attention mask that
only its model builder's graphs (GroupQueryAttention with per-row sequence lengths) read correctly; on this
exporter's graph (standard attention, concatenated cache) rows of different lengths decode wrongly after their
first token (checked by hand on a tiny Llama). Not offered: n > 1, prompt logprobs (and so scoring), prefix
caching, speculative decoding, chunked prefill, preemption (`UNSUPPORTED_FEATURES`).
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve.backends.onnxruntime_runners import make_runner
from serve.types import (CompletionOutput, EngineStats, FinishedRequestStats, FinishReason, InvalidRequestError,
                         Request, RequestOutput, SamplingParams)

UNSUPPORTED_FEATURES = ("n>1", "prompt_logprobs", "scoring", "prefix_caching", "speculative_decoding",
                        "chunked_prefill", "preemption")


def open_genai_model(path: Path) -> Any:
    """onnxruntime-genai's model for an export directory, with no EOS id: the caller decides when to stop."""
    import onnxruntime_genai as og

    config = og.Config(str(path))
    config.overlay(json.dumps({"model": {"eos_token_id": []}}))
    return og.Model(config)


@dataclass
class _Seq:
    request: Request
    detokenizer: Any
    torch_generator: Any = None  # seeded sampling
    output_ids: list[int] = field(default_factory=list)
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None
    inter_token_s: list[float] = field(default_factory=list)


class OrtEngine:
    def __init__(self, export_dir: str | Path, *, max_num_seqs: int = 64, runner: str = "batched",
                 num_threads: int | None = None) -> None:
        from transformers import AutoTokenizer

        from lifecycle.onnx_export.export import load_onnx_export
        from serve.engine.llm_engine import _eos_ids

        self.path, self.manifest, self.config = load_onnx_export(export_dir)
        self.runner_name = runner
        self.runner = make_runner(runner, self.path, self.config, num_threads=num_threads)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=False)
        self.vocab_size = int(self.config["vocab_size"])
        self.max_model_len = int(self.config.get("max_position_embeddings") or 2048)
        self.eos_token_ids = _eos_ids(self.path, self.tokenizer)
        self.max_num_seqs = max_num_seqs
        self._waiting: deque[_Seq] = deque()
        self._running: dict[str, _Seq] = {}
        self._finished_stats: list[FinishedRequestStats] = []
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0

    # --------------------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt: Any, params: SamplingParams | None = None, *,
                    priority: int = 0) -> Request:
        from serve.engine.detokenizer import IncrementalDetokenizer
        from serve.worker import sampler

        if request_id in self._running or any(s.request.request_id == request_id for s in self._waiting):
            raise InvalidRequestError("request_id", f"{request_id!r} is already running")
        params = SamplingParams() if params is None else params
        check_supported(params)
        prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else list(prompt)
        request = Request(request_id=request_id, prompt_token_ids=tuple(prompt_ids), params=params,
                          arrival_time_s=time.monotonic(), priority=priority,
                          prompt_text=prompt if isinstance(prompt, str) else None)
        request = request.validated_for(self.vocab_size, self.max_model_len)
        p = request.params
        seq = _Seq(request, IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids,
                                                   skip_special_tokens=p.skip_special_tokens, stop=p.stop,
                                                   min_tokens=p.min_tokens,
                                                   include_stop_str_in_output=p.include_stop_str_in_output))
        if p.seed is not None:
            seq.torch_generator = sampler.make_generator(p.seed_for_completion(0), "cpu")
        self._waiting.append(seq)
        return request

    def abort_request(self, request_id: str) -> bool:
        return self.finish_request(request_id, FinishReason.ABORT) is not None

    def finish_request(self, request_id: str, reason: FinishReason) -> RequestOutput | None:
        seq = self._running.get(request_id) or next((s for s in self._waiting if s.request.request_id == request_id),
                                                    None)
        if seq is None:
            return None
        self._finish(seq, reason)
        return self._output(seq, CompletionOutput(index=0, finish_reason=reason), finished=True)

    def has_unfinished_requests(self) -> bool:
        return bool(self._running or self._waiting)

    def unfinished_request_ids(self) -> list[str]:
        return [*self._running, *(s.request.request_id for s in self._waiting)]

    # ------------------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        import numpy as np
        import torch

        from serve.worker import sampler

        now = time.monotonic()
        admitted = []
        while self._waiting and len(self._running) < self.max_num_seqs:
            seq = min(self._waiting, key=lambda s: (s.request.priority, s.request.arrival_time_s))
            self._waiting.remove(seq)
            seq.first_scheduled_s = now
            self._running[seq.request.request_id] = seq
            admitted.append(seq)
        if not self._running:
            return []
        decoding = [s for s in self._running.values() if s.output_ids]
        rows = list(self.runner.prefill([(s.request.request_id, s.request.prompt_token_ids,
                                          s.request.num_prompt_tokens + s.request.params.max_tokens)
                                         for s in admitted])) if admitted else []
        if decoding:
            rows.extend(self.runner.decode([(s.request.request_id, s.output_ids[-1]) for s in decoding]))
        seqs = admitted + decoding
        logits = torch.from_numpy(np.stack(rows))  # (num_seqs, vocab)
        meta = sampler.SamplingMetadata.from_params(
            [s.request.params for s in seqs], vocab_size=self.vocab_size, device="cpu",
            prompt_token_ids=[s.request.prompt_token_ids for s in seqs], output_token_ids=[s.output_ids for s in seqs],
            eos_token_ids=tuple(self.eos_token_ids), generators=[s.torch_generator for s in seqs])
        out = sampler.sample_batch(logits, meta)
        logprobs = (out.logprobs.to_logprobs(out.token_ids, [s.request.params.logprobs or 0 for s in seqs])
                    if out.logprobs is not None else [None] * len(seqs))
        now = time.monotonic()
        outputs = []
        for seq, token_id, lp in zip(seqs, out.token_ids.tolist(), logprobs):
            keep = lp if seq.request.params.logprobs is not None else None
            delta = self._append(seq, int(token_id), keep, now)
            outputs.append(self._output(seq, delta, finished=delta.finish_reason is not None))
        return outputs

    def generate(self, prompts: list[Any], params: SamplingParams | None = None) -> list[RequestOutput]:
        """Run the prompts to completion (as LLMEngine.generate): one aggregated RequestOutput per prompt, in order."""
        from serve.engine.outputs import empty_output, merge_outputs

        ids = [f"generate-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        for rid, prompt in zip(ids, prompts):
            self.add_request(rid, prompt, params)
        merged: dict[str, list[RequestOutput]] = {rid: [] for rid in ids}
        while self.has_unfinished_requests():
            for out in self.step():
                merged.setdefault(out.request_id, []).append(out)
        return [merge_outputs(merged[rid]) if merged[rid] else empty_output(rid) for rid in ids]

    def stats(self) -> EngineStats:
        finished, self._finished_stats = self._finished_stats, []
        return EngineStats(num_running=len(self._running), num_waiting=len(self._waiting),
                           kv_cache_usage=len(self._running) / self.max_num_seqs,
                           num_prompt_tokens_total=self.num_prompt_tokens_total,
                           num_generation_tokens_total=self.num_generation_tokens_total, finished_requests=finished)

    # ---------------------------------------------------------------------------- helpers
    def _append(self, seq: _Seq, token_id: int, logprobs: Any, now: float) -> CompletionOutput:
        """As LLMEngine._append: the token, its text, and whether it ends the sequence."""
        params = seq.request.params
        seq.output_ids.append(token_id)
        self.num_generation_tokens_total += 1
        if seq.first_token_s is None:
            seq.first_token_s = now
            self.num_prompt_tokens_total += seq.request.num_prompt_tokens
        else:
            seq.inter_token_s.append(now - seq.last_token_s)
        seq.last_token_s = now
        text = seq.detokenizer.update([token_id])
        reason, stop_reason = None, None
        num_out = len(seq.output_ids)
        if seq.detokenizer.stopped:
            reason, stop_reason = FinishReason.STOP_STRING, seq.detokenizer.stop_string_hit
        elif num_out > params.min_tokens and (
                token_id in params.stop_token_ids or (not params.ignore_eos and token_id in self.eos_token_ids)):
            reason, stop_reason = FinishReason.STOP, token_id
        elif num_out >= params.max_tokens or seq.request.num_prompt_tokens + num_out >= self.max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            if reason is not FinishReason.STOP_STRING:
                text += seq.detokenizer.finish()
            self._finish(seq, reason)
        return CompletionOutput(index=0, token_ids=(token_id,), text=text,
                                logprobs=(logprobs,) if logprobs is not None else None,
                                finish_reason=reason, stop_reason=stop_reason)

    def _finish(self, seq: _Seq, reason: FinishReason) -> None:
        rid = seq.request.request_id
        if self._running.pop(rid, None) is None and seq in self._waiting:
            self._waiting.remove(seq)
        self.runner.release(rid)  # frees its KV cache
        req = seq.request
        self._finished_stats.append(FinishedRequestStats(
            request_id=rid, finish_reason=reason, num_prompt_tokens=req.num_prompt_tokens,
            num_generation_tokens=len(seq.output_ids),
            queue_s=None if seq.first_scheduled_s is None else seq.first_scheduled_s - req.arrival_time_s,
            ttft_s=None if seq.first_token_s is None else seq.first_token_s - req.arrival_time_s,
            itl_s=tuple(seq.inter_token_s), e2e_s=time.monotonic() - req.arrival_time_s))

    def _output(self, seq: _Seq, delta: CompletionOutput, *, finished: bool) -> RequestOutput:
        req = seq.request
        return RequestOutput(
            request_id=req.request_id, outputs=(delta,), finished=finished, num_prompt_tokens=req.num_prompt_tokens,
            queue_s=None if seq.first_scheduled_s is None else seq.first_scheduled_s - req.arrival_time_s,
            ttft_s=None if seq.first_token_s is None else seq.first_token_s - req.arrival_time_s,
            e2e_s=time.monotonic() - req.arrival_time_s if finished else None)


def check_supported(params: SamplingParams) -> None:
    """Requests for what this engine cannot do fail at admission naming the field (never silently ignored)."""
    if params.n != 1:
        raise InvalidRequestError("n", f"the onnxruntime backend generates one completion per request, got n={params.n}; "
                                       "send n requests or serve with --backend native")
    if params.prompt_logprobs is not None:
        raise InvalidRequestError("prompt_logprobs", "the onnxruntime backend computes logits of the last position "
                                                     "only; serve with --backend native for prompt logprobs")
    if params.speculative:
        raise InvalidRequestError("speculative", "the onnxruntime backend has no speculative decoding; "
                                                 "leave it unset or false")
