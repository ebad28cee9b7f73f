"""OpenAI request bodies (`/v1/completions`, `/v1/chat/completions`) -> serve's own types, every error an
`InvalidRequestError` naming the JSON field (the HTTP layer answers 400 with OpenAI's error JSON).

Accepted as OpenAI documents them: prompt as a string, a list of strings, a list of token ids or a list of
token-id lists; echo, logprobs (top-N, N <= 20), max_tokens (0 with echo: score the prompt only), n, stop,
seed, temperature, top_p, presence/frequency penalties, stream and stream_options.include_usage; for chat,
messages (text content or text parts), max_completion_tokens, logprobs + top_logprobs. vLLM's extra
sampling fields are accepted too (top_k, min_p, repetition_penalty, min_tokens, ignore_eos,
stop_token_ids, skip_special_tokens, include_stop_str_in_output). Features we do not have (best_of > n, logit_bias, suffix, tools,
JSON response formats) are refused naming the field rather than ignored; fields we do not know are
ignored, as vLLM does.

Everything the engine would check at admission is checked here too (`Request.validated_for`), so a
streaming request fails with a 400 before its stream starts rather than inside it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from serve.backends.base import CHAT_ROLES, Backend, ChatMessage
from serve.types import MAX_NUM_LOGPROBS, InvalidRequestError, Request, SamplingParams

MAX_PROMPTS = 1024  # prompts in one completions request (lm-eval batches a few dozen)
MAX_MESSAGES = 1024
# OpenAI field -> SamplingParams field, passed through for SamplingParams to validate and name.
_SAMPLING_FIELDS = ("temperature", "top_p", "n", "seed", "presence_penalty", "frequency_penalty", "stop",
                    "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids", "skip_special_tokens",
                    "include_stop_str_in_output")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Prompt:
    token_ids: tuple[int, ...]
    text: str | None  # the prompt as the client sent it, when it was text (echo returns it verbatim)


@dataclass(frozen=True)
class CompletionRequest:
    prompts: tuple[Prompt, ...]
    params: SamplingParams  # as run: max_tokens 1 when echo_only
    echo: bool
    echo_only: bool  # max_tokens 0 with echo: the prompt is scored, the one generated token dropped
    num_logprobs: int | None
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class ChatRequest:
    prompt: Prompt  # the conversation rendered with the chat template
    params: SamplingParams
    num_top_logprobs: int | None  # None: no logprobs
    stream: bool
    include_usage: bool


def check_model(body: Mapping[str, Any], served_name: str) -> None:
    """`model` may be left out; a different name is an error (404 in the HTTP layer, as vLLM)."""
    model = body.get("model")
    if model is not None and model != served_name:
        raise ModelNotFound(f"model: {model!r} is not served here; this server serves {served_name!r} (GET /v1/models)")


class ModelNotFound(InvalidRequestError):
    def __init__(self, message: str) -> None:
        super().__init__("model", message.removeprefix("model: "))


def parse_completion(body: Mapping[str, Any], backend: Backend) -> CompletionRequest:
    _refuse_unsupported(body, ("suffix",))
    echo = _bool(body, "echo")
    num_logprobs = _optional_int(body, "logprobs", 0, MAX_NUM_LOGPROBS)
    max_tokens = body.get("max_tokens", 16)
    if max_tokens is None:
        max_tokens = 16
    echo_only = echo and _is_int(max_tokens) and max_tokens == 0
    if _is_int(max_tokens) and max_tokens == 0 and not echo:
        raise InvalidRequestError("max_tokens", "must be >= 1 (0 only with \"echo\": true, to score the prompt)")
    prompts = _prompts(body.get("prompt"), backend)
    params = _sampling(body, max_tokens=1 if echo_only else max_tokens, logprobs=num_logprobs,
                       prompt_logprobs=num_logprobs if echo else None)
    _check_best_of(body, params.n)
    for i, prompt in enumerate(prompts):
        _admissible(prompt, params, backend, "prompt" if len(prompts) == 1 else f"prompt[{i}]")
    stream, include_usage = _stream(body)
    return CompletionRequest(prompts=prompts, params=params, echo=echo, echo_only=echo_only,
                             num_logprobs=num_logprobs, stream=stream, include_usage=include_usage)


def parse_chat(body: Mapping[str, Any], backend: Backend) -> ChatRequest:
    _refuse_unsupported(body, ("tools", "functions"))
    if body.get("tool_choice") not in (None, "none"):
        raise InvalidRequestError("tool_choice", "tools are not supported by this server")
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, Mapping)
                                        or response_format.get("type") != "text"):
        raise InvalidRequestError("response_format", "only {\"type\": \"text\"} is supported")
    wants_logprobs = _bool(body, "logprobs")
    num_top = _optional_int(body, "top_logprobs", 0, MAX_NUM_LOGPROBS)
    if num_top is not None and not wants_logprobs:
        raise InvalidRequestError("top_logprobs", "needs \"logprobs\": true")
    max_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(max_field)
    info = backend.model_info()
    if max_tokens is None:
        max_tokens = info.max_model_len  # "as many as fit": the engine clips it to the context left
    prompt = Prompt(tuple(backend.render_chat(_messages(body.get("messages")))), None)
    params = _sampling(body, max_tokens=max_tokens, logprobs=(num_top or 0) if wants_logprobs else None,
                       renames={"max_tokens": max_field, "logprobs": "top_logprobs"})
    _check_best_of(body, params.n)
    _admissible(prompt, params, backend, "messages", renames={"max_tokens": max_field})
    stream, include_usage = _stream(body)
    return ChatRequest(prompt=prompt, params=params, num_top_logprobs=num_top if wants_logprobs else None,
                       stream=stream, include_usage=include_usage)


# -- pieces ---------------------------------------------------------------------------------------------


def _prompts(prompt: Any, backend: Backend) -> tuple[Prompt, ...]:
    shape = "a string, a list of strings, a list of token ids or a list of token-id lists"
    if isinstance(prompt, str):
        return (Prompt(tuple(backend.tokenize(prompt)), prompt),)
    if not isinstance(prompt, list) or not prompt:
        raise InvalidRequestError("prompt", f"is {'empty' if prompt == [] else 'missing or not ' + shape}: "
                                            f"give {shape}")
    if len(prompt) > MAX_PROMPTS:
        raise InvalidRequestError("prompt", f"at most {MAX_PROMPTS} prompts in one request, got {len(prompt)}")
    if all(_is_int(t) for t in prompt):
        return (Prompt(_token_ids(prompt, "prompt"), None),)
    if all(isinstance(p, str) for p in prompt):
        return tuple(Prompt(tuple(backend.tokenize(p)), p) for p in prompt)
    if all(isinstance(p, list) for p in prompt):
        return tuple(Prompt(_token_ids(p, f"prompt[{i}]"), None) for i, p in enumerate(prompt))
    raise InvalidRequestError("prompt", f"mixes kinds of items: give {shape}")


def _token_ids(ids: list, field: str) -> tuple[int, ...]:
    bad = [t for t in ids if not _is_int(t) or t < 0]
    if bad:
        raise InvalidRequestError(field, f"token ids must be integers >= 0, got {bad[0]!r}")
    return tuple(ids)


def _messages(messages: Any) -> list[ChatMessage]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages", "must be a non-empty list of {\"role\", \"content\"} objects")
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequestError("messages", f"at most {MAX_MESSAGES} messages, got {len(messages)}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidRequestError(f"messages[{i}]", "must be an object with \"role\" and \"content\"")
        role = "system" if m.get("role") == "developer" else m.get("role")  # OpenAI's newer name for system
        if role not in CHAT_ROLES:
            raise InvalidRequestError(f"messages[{i}].role", f"unknown role {str(role)[:40]!r}: use one of "
                                                            f"{', '.join(CHAT_ROLES)}")
        out.append(ChatMessage(role, _content(m.get("content"), f"messages[{i}].content")))
    return out


def _content(content: Any, field: str) -> str:
    """A string, or OpenAI's list of parts of which only {"type": "text", "text": ...} is supported."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(field, "must be a string or a list of {\"type\": \"text\", \"text\": ...} parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequestError(f"{field}[{j}]", "only text parts ({\"type\": \"text\", \"text\": ...}) "
                                                       "are supported")
        texts.append(part["text"])
    return "".join(texts)


def _sampling(body: Mapping[str, Any], *, max_tokens: Any, logprobs: int | None, prompt_logprobs: int | None = None,
              renames: Mapping[str, str] | None = None) -> SamplingParams:
    """JSON null means "the default", as in OpenAI's API."""
    kwargs = {name: body[name] for name in _SAMPLING_FIELDS if body.get(name) is not None}
    top_k = body.get("top_k")
    if top_k is not None:
        kwargs["top_k"] = None if top_k in (-1, 0) else top_k  # vLLM's "off" values
    try:
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs, **kwargs)
    except InvalidRequestError as err:
        raise _renamed(err, renames or {}) from None


def _admissible(prompt: Prompt, params: SamplingParams, backend: Backend, prompt_field: str,
                renames: Mapping[str, str] | None = None) -> None:
    info = backend.model_info()
    try:
        Request(request_id="check", prompt_token_ids=prompt.token_ids, params=params,
                arrival_time_s=0.0).validated_for(info.vocab_size, info.max_model_len)
    except InvalidRequestError as err:
        raise _renamed(err, {"prompt": prompt_field, "prompt_token_ids": prompt_field, **(renames or {})}) from None


def _renamed(err: InvalidRequestError, renames: Mapping[str, str]) -> InvalidRequestError:
    if err.field not in renames:
        return err
    return InvalidRequestError(renames[err.field], str(err).removeprefix(f"{err.field}: "))


def _stream(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, Mapping):
        raise InvalidRequestError("stream_options", "must be an object like {\"include_usage\": true}")
    if not stream:
        raise InvalidRequestError("stream_options", "is only allowed with \"stream\": true")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise InvalidRequestError("stream_options.include_usage", f"must be true or false, got {include_usage!r}")
    return stream, include_usage


def _bool(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequestError(name, f"must be true or false, got {value!r}")
    return value


def _optional_int(body: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value) or not low <= value <= high:
        raise InvalidRequestError(name, f"must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def _check_best_of(body: Mapping[str, Any], n: int) -> None:
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise InvalidRequestError("best_of", f"is not supported (only best_of == n); got {best_of!r} with n={n}")


def _refuse_unsupported(body: Mapping[str, Any], names: tuple[str, ...]) -> None:
    for name in (*names, "logit_bias"):
        if body.get(name) not in (None, {}, [], ""):
            raise InvalidRequestError(name, "is not supported by this server; leave it out")
