"""NativeBackend: the Backend Protocol over lmforge's own engine (serve/engine/async_engine.py).

The engine runs in its own thread (AsyncEngine); this class only translates. It keeps its own
tokenizer instance for tokenize / chat / detokenize on the server's event loop, so the engine thread's
tokenizer is never used from two threads at once. Prompts reach the engine as token ids, so the ids a
client is told about (Tokenize, prompt logprobs) are the ids that ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from serve.backends import tokenizing
from serve.backends.base import ChatMessage, ModelInfo, SpeculativeInfo, notify_stats_listeners
from serve.scoring import LoglikelihoodQuery, Scorer, ScoreResult, ScoreText
from serve.types import EngineStats, Logprobs, RequestOutput, SamplingParams, TokenLogprob

log = logging.getLogger(__name__)


class NativeBackend:
    name = "native"

    def __init__(self, config: Any) -> None:
        """`config` is a serve.engine.llm_engine.EngineConfig (imported lazily: the API layers import this
        module without torch)."""
        self.config = config
        self.llm_engine: Any = None  # the LLMEngine, once started (tests read its KV usage)
        self._async: Any = None
        self._tokenizer: Any = None
        self._scorer: Scorer | None = None
        self._token_texts: dict[int, str] = {}
        self._stats_listeners: tuple[Callable[[EngineStats], None], ...] = ()

    # ------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        from serve.engine.async_engine import AsyncEngine
        from serve.engine.llm_engine import LLMEngine

        self.llm_engine = await asyncio.to_thread(LLMEngine, self.config)
        self._tokenizer = await asyncio.to_thread(self.llm_engine.checkpoint.load_tokenizer)
        self._async = AsyncEngine(self.llm_engine, on_stats=self._publish_stats)
        eos = sorted(self.llm_engine.eos_token_ids)
        # lm-eval scores a text's first token after the end-of-text token (its `prefix_token_id`).
        prefix = self._tokenizer.eos_token_id if self._tokenizer.eos_token_id is not None else eos[0]
        self._scorer = Scorer(self.generate, self.tokenize, prefix_token_id=prefix,
                              vocab_size=self.llm_engine.runner.vocab_size,
                              max_model_len=self.llm_engine.max_model_len)

    async def shutdown(self) -> None:
        if self._async is not None:
            await asyncio.to_thread(self._async.shutdown)

    # ------------------------------------------------------------------------------ requests
    async def generate(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams, *,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        stream = self._async.generate(request_id, list(prompt_token_ids), params, priority=priority)
        # aclosing: leaving this generator early must close the engine's at once (that aborts the request).
        async with contextlib.aclosing(stream):
            async for out in stream:
                yield self._with_token_texts(out)

    async def score(self, request_id: str, loglikelihood: Sequence[LoglikelihoodQuery],
                    rolling: Sequence[ScoreText], *, priority: int = 0) -> ScoreResult:
        return await self._scorer.score(request_id, loglikelihood, rolling, priority=priority)

    def abort(self, request_id: str) -> None:
        self._async.abort(request_id)

    def stats(self) -> EngineStats:
        return self._async.stats()

    def add_stats_listener(self, listener: Callable[[EngineStats], None]) -> None:
        self._stats_listeners = (*self._stats_listeners, listener)  # replaced whole: the engine thread iterates it

    def _publish_stats(self, stats: EngineStats) -> None:
        notify_stats_listeners(self._stats_listeners, stats)

    # ------------------------------------------------------------------------------ tokenizer
    def tokenize(self, text: str) -> list[int]:
        return tokenizing.tokenize(self._tokenizer, text)

    def render_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        return tokenizing.render_chat(self._tokenizer, messages, f"checkpoint ({Path(self.config.model).name})")

    def detokenize(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return tokenizing.detokenize(self._tokenizer, token_ids, self.llm_engine.runner.vocab_size,
                                     skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------ model info
    def model_info(self) -> ModelInfo:
        engine, cfg = self.llm_engine, self.config
        checkpoint = engine.checkpoint
        architectures = checkpoint.config.get("architectures") or []
        speculative = SpeculativeInfo()
        if cfg.speculative_method:
            speculative = SpeculativeInfo(method=cfg.speculative_method,
                                          num_speculative_tokens=cfg.num_speculative_tokens,
                                          draft_model=Path(cfg.draft_model).name if cfg.draft_model else None,
                                          enabled_by_default=cfg.speculative_by_default)
        return ModelInfo(
            name=checkpoint.path.name, architecture=",".join(architectures),
            model_type=str(checkpoint.config.get("model_type", "")), vocab_size=engine.runner.vocab_size,
            max_model_len=engine.max_model_len, dtype=str(engine.runner.model.dtype).removeprefix("torch."),
            has_chat_template=bool(getattr(self._tokenizer, "chat_template", None)),
            eos_token_ids=tuple(sorted(engine.eos_token_ids)), backend=self.name,
            quantization=checkpoint.quantization, manifest=checkpoint.manifest, speculative=speculative)

    # ------------------------------------------------------------------------------ helpers
    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def _with_token_texts(self, out: RequestOutput) -> RequestOutput:
        """The engine leaves TokenLogprob.text empty; clients want to see the alternatives."""
        if out.prompt_logprobs is None and all(c.logprobs is None for c in out.outputs):
            return out

        def fill(position: Logprobs | None) -> Logprobs | None:
            if position is None:
                return None
            return Logprobs(chosen=self._filled(position.chosen), top=tuple(self._filled(t) for t in position.top))

        outputs = tuple(c if c.logprobs is None else dataclasses.replace(c, logprobs=tuple(map(fill, c.logprobs)))
                        for c in out.outputs)
        prompt_logprobs = None if out.prompt_logprobs is None else tuple(map(fill, out.prompt_logprobs))
        return dataclasses.replace(out, outputs=outputs, prompt_logprobs=prompt_logprobs)

    def _filled(self, entry: TokenLogprob) -> TokenLogprob:
        return entry if entry.text is not None else dataclasses.replace(entry, text=self._token_text(entry.token_id))
