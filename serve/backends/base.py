"""Backend: the one interface the API layers (gRPC now, OpenAI HTTP later) use to reach a model.

The servers never import the engine: they hold a `Backend` and speak serve/types.py (SamplingParams,
RequestOutput, EngineStats) and the few types below. `NativeBackend` (serve/backends/native.py) runs
lmforge's own engine; a vLLM backend will sit behind the same Protocol.

Call order:

    backend = NativeBackend(config)   # cheap: nothing is loaded yet
    await backend.start()             # loads the model (seconds to minutes; the server says NOT_SERVING)
    # then, any number of times and concurrently, from the event loop that called start():
    backend.generate(...)             # an async iterator of RequestOutput deltas
    await backend.score(...)          # log-likelihoods (serve/scoring.py)
    backend.tokenize(...) / backend.render_chat(...) / backend.detokenize(...)
    backend.model_info() / backend.stats()
    backend.add_stats_listener(fn)    # fn(EngineStats) after every engine step (serve/metrics.py)
    backend.abort(request_id)         # also implied by leaving a generate() iterator early
    await backend.shutdown()          # after the server has drained; streams still open end unfinished

Errors a client caused raise `InvalidRequestError` naming the field (the API maps it to
INVALID_ARGUMENT); anything else is the server's fault.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from serve.scoring import LoglikelihoodQuery, ScoreResult, ScoreText
from serve.types import EngineStats, RequestOutput, SamplingParams

log = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatMessage:
    role: str  # one of CHAT_ROLES (checked by the API layer, which names the offending message)
    content: str


@dataclass(frozen=True)
class SpeculativeInfo:
    method: str | None = None  # "ngram", "draft" or None (off)
    num_speculative_tokens: int = 0
    draft_model: str | None = None  # the draft checkpoint's directory name
    enabled_by_default: bool = False


@dataclass(frozen=True)
class ModelInfo:
    """What is being served. `manifest` is the checkpoint's manifest.json (None for a plain transformers
    directory); `quantization` its quantization config (None when not quantized)."""

    name: str
    architecture: str
    model_type: str
    vocab_size: int
    max_model_len: int
    dtype: str
    has_chat_template: bool
    eos_token_ids: tuple[int, ...]
    backend: str
    quantization: dict[str, Any] | None = None
    manifest: dict[str, Any] | None = None
    speculative: SpeculativeInfo = field(default_factory=SpeculativeInfo)
    # Features of the API this backend cannot offer (e.g. "prefix_caching"); a request asking for one gets
    # InvalidRequestError naming its field instead of silently different behaviour.
    unsupported_features: tuple[str, ...] = ()


@runtime_checkable
class Backend(Protocol):
    """A served model. See the module docstring for the call order."""

    name: str

    async def start(self) -> None:
        """Load the model and start the engine; returns when requests can be served."""

    def generate(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams, *,
                 priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Stream one request's deltas. `request_id` is unique among running requests (the caller's job).
        An invalid request raises InvalidRequestError on the first `__anext__`, before any delta.
        Closing the iterator early (aclose, cancellation) aborts the request and frees its KV cache."""

    async def score(self, request_id: str, loglikelihood: Sequence[LoglikelihoodQuery],
                    rolling: Sequence[ScoreText], *, priority: int = 0) -> ScoreResult:
        """Log-likelihoods of continuations given contexts, and rolling log-likelihoods of texts."""

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` exactly as a text prompt is tokenized (no special tokens added)."""

    def render_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Token ids of a conversation rendered with the chat template and a generation prompt;
        InvalidRequestError("chat", ...) when the checkpoint has no template or it refuses the messages."""

    def detokenize(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `token_ids`; InvalidRequestError("token_ids", ...) for ids outside the vocabulary."""

    def model_info(self) -> ModelInfo: ...

    def stats(self) -> EngineStats:
        """The engine's latest snapshot (gauges and cumulative counters)."""

    def add_stats_listener(self, listener: Callable[[EngineStats], None]) -> None:
        """Call `listener` with every engine step's EngineStats from now on, each finished request in exactly
        one of them (polling `stats()` would miss those of the steps between two polls). It runs on the
        engine's thread: keep it quick and thread-safe; an exception it raises is logged and swallowed."""

    def abort(self, request_id: str) -> None:
        """Stop a running request and free its KV cache; unknown or finished ids are ignored."""

    async def shutdown(self) -> None:
        """Stop the engine. Call once, after start(), when no more requests will come."""


def notify_stats_listeners(listeners: Sequence[Callable[[EngineStats], None]], stats: EngineStats) -> None:
    """Call every `add_stats_listener` listener with `stats`; one that raises is logged and the others still run."""
    for listener in listeners:
        try:
            listener(stats)
        except Exception:  # noqa: BLE001 - one broken listener must not starve the others
            log.exception("stats listener %r failed", listener)
