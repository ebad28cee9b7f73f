"""Between lmforge.v1 messages and serve's own types: requests in (validated, errors naming the proto
field), RequestOutput deltas and scores out. No engine here: only serve/types.py, serve/scoring.py and
the Backend's types."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import fields

from serve.api._gen.lmforge.v1 import common_pb2, generation_pb2, model_pb2, scoring_pb2, sampling_pb2
from serve.backends.base import CHAT_ROLES, Backend, ChatMessage, ModelInfo
from serve.scoring import LoglikelihoodQuery, ScoreResult, ScoreText, TokenScores
from serve.types import (MAX_NUM_STOP_STRINGS, FinishReason, InvalidRequestError, Logprobs, RequestOutput,
                         SamplingParams, TokenLogprob)

# Caps on repeated fields the engine would otherwise walk in full (the message size caps the rest).
MAX_STOP_TOKEN_IDS = 256
MAX_CHAT_MESSAGES = 1024
MAX_REQUEST_ID_CHARS = 256

SAMPLING_FIELDS = frozenset(f.name for f in fields(SamplingParams))
_PROTO_SAMPLING_FIELDS = frozenset(f.name for f in sampling_pb2.SamplingParams.DESCRIPTOR.fields)
_FINISH_REASONS = {
    None: generation_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: generation_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: generation_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP_STRING: generation_pb2.FINISH_REASON_STOP_STRING,
    FinishReason.ABORT: generation_pb2.FINISH_REASON_ABORT,
    FinishReason.ERROR: generation_pb2.FINISH_REASON_ERROR,
}


def api_error(err: InvalidRequestError, prompt_field: str) -> InvalidRequestError:
    """The engine names its own fields ("temperature", "prompt_token_ids"); clients need the proto path."""
    if err.field in SAMPLING_FIELDS:
        path = f"sampling.{err.field}"
    elif err.field in ("prompt", "prompt_token_ids"):
        path = prompt_field
    else:
        return err
    message = str(err).removeprefix(f"{err.field}: ")
    return InvalidRequestError(path, message)


# -- requests ---------------------------------------------------------------------------------------


def sampling_params(msg: sampling_pb2.SamplingParams) -> SamplingParams:
    """Set fields override SamplingParams' defaults; SamplingParams validates them (field names kept)."""
    if len(msg.stop) > MAX_NUM_STOP_STRINGS:
        raise InvalidRequestError("sampling.stop", f"at most {MAX_NUM_STOP_STRINGS} strings, got {len(msg.stop)}")
    if len(msg.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequestError("sampling.stop_token_ids",
                                  f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(msg.stop_token_ids)}")
    # Only what the proto carries: the engine may know more fields than the API exposes.
    kwargs = {name: getattr(msg, name) for name in SAMPLING_FIELDS - {"stop", "stop_token_ids", "ignore_eos"}
              if name in _PROTO_SAMPLING_FIELDS and msg.HasField(name)}
    try:
        return SamplingParams(stop=tuple(msg.stop), stop_token_ids=tuple(msg.stop_token_ids),
                              ignore_eos=msg.ignore_eos, **kwargs)
    except InvalidRequestError as err:
        raise api_error(err, "prompt") from None


def request_id(msg_request_id: str, fallback: str) -> str:
    if len(msg_request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequestError("request_id", f"at most {MAX_REQUEST_ID_CHARS} characters, got {len(msg_request_id)}")
    return msg_request_id or fallback


def chat_messages(chat: common_pb2.Chat, path: str = "chat") -> list[ChatMessage]:
    if not chat.messages:
        raise InvalidRequestError(f"{path}.messages", "is empty: give at least one message")
    if len(chat.messages) > MAX_CHAT_MESSAGES:
        raise InvalidRequestError(f"{path}.messages", f"at most {MAX_CHAT_MESSAGES} messages, got {len(chat.messages)}")
    for i, m in enumerate(chat.messages):
        if m.role not in CHAT_ROLES:
            raise InvalidRequestError(f"{path}.messages[{i}].role",
                                      f"unknown role {m.role[:40]!r}: use one of {', '.join(CHAT_ROLES)}")
    return [ChatMessage(m.role, m.content) for m in chat.messages]


def prompt_token_ids(request: generation_pb2.GenerateRequest | model_pb2.TokenizeRequest,
                     backend: Backend, oneof: str) -> tuple[str, list[int]]:
    """(the proto field the prompt came in, its token ids)."""
    kind = request.WhichOneof(oneof)
    if kind == "text":
        return kind, backend.tokenize(request.text)
    if kind == "token_ids":
        return kind, list(request.token_ids.ids)
    if kind == "chat":
        return kind, backend.render_chat(chat_messages(request.chat))
    choices = [f.name for f in request.DESCRIPTOR.oneofs_by_name[oneof].fields]
    raise InvalidRequestError(oneof, f"is missing: set one of {', '.join(choices)}")


def score_text(msg: common_pb2.TextOrTokens, path: str) -> ScoreText:
    kind = msg.WhichOneof("kind")
    if kind == "text":
        return msg.text
    if kind == "tokens":
        return tuple(msg.tokens.ids)
    raise InvalidRequestError(path, "is missing: give text or tokens")


def score_queries(request: scoring_pb2.ScoreRequest) -> tuple[list[LoglikelihoodQuery], list[ScoreText]]:
    ll = [LoglikelihoodQuery(context=score_text(q.context, f"loglikelihood[{i}].context"),
                             continuations=tuple(score_text(c, f"loglikelihood[{i}].continuations[{j}]")
                                                 for j, c in enumerate(q.continuations)))
          for i, q in enumerate(request.loglikelihood)]
    rolling = [score_text(q.text, f"rolling[{k}].text") for k, q in enumerate(request.rolling)]
    return ll, rolling


# -- responses --------------------------------------------------------------------------------------


def token_logprob(t: TokenLogprob) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(token_id=t.token_id, logprob=t.logprob, rank=t.rank or 0, text=t.text or "")


def position_logprobs(position: Logprobs | None) -> common_pb2.PositionLogprobs:
    if position is None:  # the prompt's first token: nothing predicts it
        return common_pb2.PositionLogprobs()
    return common_pb2.PositionLogprobs(chosen=token_logprob(position.chosen),
                                       top=[token_logprob(t) for t in position.top])


def _set_stop_reason(completion: generation_pb2.Completion, stop_reason: str | int | None) -> None:
    if isinstance(stop_reason, str):
        completion.stop_string = stop_reason
    elif isinstance(stop_reason, int):
        completion.stop_token_id = stop_reason


class ResponseBuilder:
    """Turns one request's RequestOutput deltas into GenerateResponse messages: `delta()` per stream message,
    or `add()` each then `whole()` for Generate's single response."""

    def __init__(self, request_id: str, prompt_token_ids: Sequence[int]) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.num_completion_tokens = 0
        self._parts: dict[int, list] = {}  # index -> its CompletionOutput deltas, for whole()
        self._prompt_logprobs: tuple[Logprobs | None, ...] | None = None
        self._last: RequestOutput | None = None

    def delta(self, out: RequestOutput) -> generation_pb2.GenerateResponse:
        self.num_completion_tokens += sum(len(c.token_ids) for c in out.outputs)
        response = self._envelope(out, out.prompt_logprobs)
        response.completions.extend(self._completion(c.index, [c]) for c in out.outputs)
        return response

    def add(self, out: RequestOutput) -> None:
        self.num_completion_tokens += sum(len(c.token_ids) for c in out.outputs)
        for c in out.outputs:
            self._parts.setdefault(c.index, []).append(c)
        if out.prompt_logprobs is not None:
            self._prompt_logprobs = out.prompt_logprobs
        self._last = out

    def whole(self) -> generation_pb2.GenerateResponse:
        if self._last is None:
            raise RuntimeError(f"{self.request_id}: the backend ended the request without any output")
        response = self._envelope(self._last, self._prompt_logprobs)
        response.completions.extend(self._completion(index, self._parts[index]) for index in sorted(self._parts))
        return response

    def _envelope(self, out: RequestOutput, prompt_logprobs: tuple[Logprobs | None, ...] | None,
                  ) -> generation_pb2.GenerateResponse:
        response = generation_pb2.GenerateResponse(request_id=self.request_id, finished=out.finished)
        response.usage.prompt_tokens = out.num_prompt_tokens
        response.usage.completion_tokens = self.num_completion_tokens
        response.usage.cached_prompt_tokens = out.num_cached_tokens
        for name, value in (("queue_s", out.queue_s), ("ttft_s", out.ttft_s), ("total_s", out.e2e_s)):
            if value is not None:
                setattr(response.timings, name, value)
        if prompt_logprobs is not None:
            response.prompt_token_ids.extend(self.prompt_token_ids)
            response.prompt_logprobs.extend(position_logprobs(p) for p in prompt_logprobs)
        return response

    @staticmethod
    def _completion(index: int, parts: list) -> generation_pb2.Completion:
        completion = generation_pb2.Completion(index=index, text="".join(p.text for p in parts),
                                               finish_reason=_FINISH_REASONS[parts[-1].finish_reason])
        for p in parts:
            completion.token_ids.extend(p.token_ids)
            if p.logprobs is not None:
                completion.logprobs.extend(position_logprobs(lp) for lp in p.logprobs)
        _set_stop_reason(completion, parts[-1].stop_reason)
        return completion


def score_response(result: ScoreResult, request_id: str, *, with_tokens: bool) -> scoring_pb2.ScoreResponse:
    def continuation(s: TokenScores) -> scoring_pb2.ContinuationScore:
        return scoring_pb2.ContinuationScore(logprob=s.logprob, is_greedy=s.is_greedy, num_tokens=s.num_tokens,
                                             tokens=[token_logprob(t) for t in s.tokens] if with_tokens else [])

    response = scoring_pb2.ScoreResponse(request_id=request_id)
    for per_query in result.loglikelihood:
        response.loglikelihood.add(continuations=[continuation(s) for s in per_query])
    for s in result.rolling:
        response.rolling.add(logprob=s.logprob, is_greedy=s.is_greedy, num_tokens=s.num_tokens,
                             num_windows=s.num_windows,
                             tokens=[token_logprob(t) for t in s.tokens] if with_tokens else [])
    return response


def model_info(info: ModelInfo, lmforge_version: str) -> model_pb2.ModelInfo:
    spec = info.speculative
    return model_pb2.ModelInfo(
        name=info.name, architecture=info.architecture, model_type=info.model_type, vocab_size=info.vocab_size,
        max_model_len=info.max_model_len, dtype=info.dtype,
        quantization_json=json.dumps(info.quantization, sort_keys=True) if info.quantization else "",
        speculative=model_pb2.SpeculativeConfig(method=spec.method or "",
                                                num_speculative_tokens=spec.num_speculative_tokens,
                                                draft_model=spec.draft_model or "",
                                                enabled_by_default=spec.enabled_by_default),
        manifest_json=json.dumps(info.manifest, sort_keys=True) if info.manifest else "",
        has_chat_template=info.has_chat_template, eos_token_ids=list(info.eos_token_ids), backend=info.backend,
        lmforge_version=lmforge_version, unsupported_features=list(info.unsupported_features))
