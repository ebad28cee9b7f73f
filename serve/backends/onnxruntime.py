"""OnnxRuntimeBackend: the Backend Protocol (serve/backends/base.py) over an ONNX export
(`lmforge export --format onnx`), run by onnxruntime (serve/backends/onnxruntime_engine.py: plain onnxruntime with
continuous batching, or one onnxruntime-genai Generator per sequence).

Same call order as NativeBackend, whose request plumbing it reuses: the OrtEngine runs in AsyncEngine's thread
(streaming, cancellation by closing the stream, stats listeners after every step), tokenization is the export's
own tokenizer files. What the engine cannot offer is listed in `ModelInfo.unsupported_features`, and a request
asking for it gets InvalidRequestError naming the field: n > 1, prompt_logprobs, speculative, and Score.

`build_backend(path)` is the factory a backend test-suite plugs in: an export directory -> a Backend.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from serve.backends import tokenizing
from serve.backends.base import ChatMessage, ModelInfo
from serve.backends.native import NativeBackend
from serve.scoring import LoglikelihoodQuery, ScoreResult, ScoreText
from serve.types import InvalidRequestError


class OnnxRuntimeBackend(NativeBackend):
    name = "onnxruntime"

    def __init__(self, export_dir: str | Path, *, max_num_seqs: int = 64, runner: str = "batched") -> None:
        super().__init__(config=None)
        self.export_dir = Path(export_dir)
        self.max_num_seqs = max_num_seqs
        self.runner = runner  # serve/backends/onnxruntime_runners.py: "batched" or "genai"

    async def start(self) -> None:
        from serve.backends.onnxruntime_engine import OrtEngine
        from serve.engine.async_engine import AsyncEngine

        self.llm_engine = await asyncio.to_thread(OrtEngine, self.export_dir, max_num_seqs=self.max_num_seqs,
                                                runner=self.runner)
        self._tokenizer = await asyncio.to_thread(self._load_tokenizer)
        self._async = AsyncEngine(self.llm_engine, on_stats=self._publish_stats)

    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.export_dir, trust_remote_code=False)

    async def score(self, request_id: str, loglikelihood: Sequence[LoglikelihoodQuery],
                    rolling: Sequence[ScoreText], *, priority: int = 0) -> ScoreResult:
        raise InvalidRequestError("score", "log-likelihoods need prompt logprobs, which the onnxruntime backend does "
                                           "not compute (it keeps the last position's logits only); serve the "
                                           "source checkpoint with --backend native to score")

    def detokenize(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return tokenizing.detokenize(self._tokenizer, token_ids, self.llm_engine.vocab_size,
                                     skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        return tokenizing.render_chat(self._tokenizer, messages, f"export ({self.export_dir.name})")

    def model_info(self) -> ModelInfo:
        from serve.backends.onnxruntime_engine import UNSUPPORTED_FEATURES

        engine = self.llm_engine
        manifest = engine.manifest
        return ModelInfo(
            name=self.export_dir.name, architecture=",".join(engine.config.get("architectures") or []),
            model_type=str(engine.config.get("model_type", "")), vocab_size=engine.vocab_size,
            max_model_len=engine.max_model_len, dtype=manifest["model"]["dtype"],
            has_chat_template=bool(getattr(self._tokenizer, "chat_template", None)),
            eos_token_ids=tuple(sorted(engine.eos_token_ids)), backend=self.name,
            quantization=manifest.get("quantization"), manifest=manifest,
            unsupported_features=UNSUPPORTED_FEATURES)


def build_backend(export_dir: str | Path, **kwargs) -> OnnxRuntimeBackend:
    """The factory for a backend test-suite: an ONNX export directory -> a Backend (not started)."""
    return OnnxRuntimeBackend(export_dir, **kwargs)
