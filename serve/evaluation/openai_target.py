"""OpenAITarget: evaluation against any OpenAI-compatible server (`--target http://host:port/v1`).

Written against the OpenAI API's legacy Completions endpoint (POST /v1/completions), as
lm-evaluation-harness's `local-completions` model uses it:

- log-likelihood: `echo: true, logprobs: 1, max_tokens: 1, temperature: 0` — the response's
  `choices[i].logprobs.token_logprobs` / `top_logprobs` cover the prompt's tokens (then one generated
  token, ignored). A token's `is_greedy` holds when its logprob is the largest of its `top_logprobs`.
  With `--tokenizer DIR` (the served model's tokenizer) prompts are sent as token ids, split into context
  and continuation exactly as lm-eval does (serve/scoring.py `encode_pair`), and rolling log-likelihoods
  use its disjoint windows. Without one, prompts are sent as text and the continuation is the tokens
  whose `text_offset` lies at or after the context's end (a token straddling the boundary counts as
  context); rolling log-likelihood needs the tokenizer.
- generation: `prompt`, `max_tokens`, `temperature: 0`, `stop` (the stop strings are applied here too,
  for servers that accept fewer of them).

The model name comes from `--model`, else from GET /v1/models (the first entry, whose `max_model_len`
sets the window size when the server reports it, as vLLM and lmforge do).
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from typing import Any

from lifecycle.errors import ConfigError
from serve.evaluation.items import EvalRequest, GenerationRequest, LoglikelihoodRequest, RollingRequest
from serve.evaluation.results import Answer, GenerationAnswer, LoglikelihoodAnswer, RollingAnswer
from serve.evaluation.target import MAX_STOP_STRINGS, TargetError, TransientError
from serve.scoring import encode_pair, rolling_windows

RETRYABLE_HTTP = (408, 409, 429, 500, 502, 503, 504)
DEFAULT_MAX_LENGTH = 2048  # lm-eval's default for API models when the server does not say


class OpenAITarget:
    def __init__(self, base_url: str, *, api_key: str | None = None, tokenizer: str | None = None,
                 model: str | None = None, max_length: int | None = None, timeout_s: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key, self.timeout_s = api_key, timeout_s
        self._model, self._max_length = model, max_length
        self._tokenizer_dir = tokenizer
        self._tokenizer: Any = None
        self._lock = threading.Lock()  # HF fast tokenizers are not safe to call from many threads at once
        self._described: dict[str, Any] | None = None

    # -- EvalTarget ---------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        if self._described is None:
            entry: dict[str, Any] = {}
            if self._model is None or self._max_length is None:
                models = self._request("GET", "/models").get("data") or []
                entry = next((m for m in models if m.get("id") == self._model), models[0] if models else {})
                if self._model is None:
                    if not entry.get("id"):
                        raise TargetError(f"{self.base_url}/models lists no model: pass --model NAME")
                    self._model = entry["id"]
            if self._max_length is None:
                self._max_length = int(entry.get("max_model_len") or DEFAULT_MAX_LENGTH)
            if self._tokenizer_dir is not None:
                self._load_tokenizer()
            self._described = {"target": self.base_url, "api": "OpenAI completions", "model": self._model,
                               "max_model_len": self._max_length, "tokenizer": self._tokenizer_dir}
        return self._described

    def answer(self, request: EvalRequest) -> Answer:
        self.describe()
        if isinstance(request, LoglikelihoodRequest):
            return self._loglikelihood(request)
        if isinstance(request, RollingRequest):
            return self._rolling(request)
        if isinstance(request, GenerationRequest):
            return self._generate(request)
        raise TypeError(f"unknown request {type(request).__name__}")

    def close(self) -> None:
        pass

    # -- requests ---------------------------------------------------------------------------------------
    def _score_body(self, prompts: list) -> dict[str, Any]:
        return {"model": self._model, "prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1,
                "temperature": 0, "seed": 1234}

    def _loglikelihood(self, request: LoglikelihoodRequest) -> LoglikelihoodAnswer:
        if self._tokenizer is not None:
            spans, prompts = [], []
            for continuation in request.continuations:
                context_ids, continuation_ids = self._encode_pair(request.context, continuation)
                prompts.append(context_ids + continuation_ids)
                spans.append((len(context_ids), len(context_ids) + len(continuation_ids)))
            choices = self._choices(self._request("POST", "/completions", self._score_body(prompts)), len(prompts))
            scored = [self._span(c, start, end) for c, (start, end) in zip(choices, spans)]
        else:
            prompts = [request.context + c for c in request.continuations]
            choices = self._choices(self._request("POST", "/completions", self._score_body(prompts)), len(prompts))
            scored = [self._span_by_offset(c, len(request.context), len(p)) for c, p in zip(choices, prompts)]
        return LoglikelihoodAnswer(tuple(s[0] for s in scored), tuple(s[1] for s in scored),
                                   tuple(s[2] for s in scored))

    def _rolling(self, request: RollingRequest) -> RollingAnswer:
        if self._tokenizer is None:
            raise ConfigError("perplexity against an OpenAI-compatible target needs the model's tokenizer: "
                              "pass --tokenizer DIR (the checkpoint directory)")
        with self._lock:
            token_ids = self._tokenizer.encode(request.text, add_special_tokens=False)
        # Windows as lmforge's server makes them (serve/scoring.py): L + 1 prompt tokens, then one generated.
        windows = rolling_windows(token_ids, self._prefix_token_id(), self._max_length - 2)
        prompts = [context + continuation for context, continuation in windows]
        choices = self._choices(self._request("POST", "/completions", self._score_body(prompts)), len(prompts))
        logprob = num_tokens = 0
        for choice, (context, continuation) in zip(choices, windows):
            lp, _, n = self._span(choice, len(context), len(context) + len(continuation))
            logprob, num_tokens = logprob + lp, num_tokens + n
        return RollingAnswer(logprob, num_tokens)

    def _generate(self, request: GenerationRequest) -> GenerationAnswer:
        body = {"model": self._model, "prompt": request.prompt, "max_tokens": request.max_tokens,
                "temperature": 0, "seed": 1234}
        if request.until:
            body["stop"] = list(request.until[:MAX_STOP_STRINGS])
        text = self._choices(self._request("POST", "/completions", body), 1)[0].get("text") or ""
        for stop in request.until:  # servers may accept fewer stop strings than the task has
            if stop and stop in text:
                text = text[:text.index(stop)]
        return GenerationAnswer(text)

    # -- pieces -------------------------------------------------------------------------------------------
    def _load_tokenizer(self) -> None:
        from transformers import AutoTokenizer

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_dir)
        except (OSError, ValueError) as err:
            raise ConfigError(f"--tokenizer {self._tokenizer_dir}: cannot load a tokenizer there: {err}") from None

    def _prefix_token_id(self) -> int:
        tok = self._tokenizer
        prefix = tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id
        if prefix is None:
            raise ConfigError(f"--tokenizer {self._tokenizer_dir}: has no EOS or BOS token to score a text's first token after")
        return prefix

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        with self._lock:
            context_ids, continuation_ids = encode_pair(
                lambda s: self._tokenizer.encode(s, add_special_tokens=False), context, continuation)
        context_ids = context_ids or [self._prefix_token_id()]
        room = self._max_length - 1 - len(continuation_ids)  # the server must still generate one token
        if room < 1:
            raise TargetError(f"a continuation of {len(continuation_ids)} tokens does not fit the model's "
                              f"{self._max_length} tokens")
        return context_ids[-room:], continuation_ids

    @staticmethod
    def _choices(response: dict[str, Any], expected: int) -> list[dict[str, Any]]:
        choices = sorted(response.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != expected:
            raise TargetError(f"the server returned {len(choices)} choices for {expected} prompts")
        return choices

    @staticmethod
    def _logprobs(choice: dict[str, Any]) -> dict[str, Any]:
        logprobs = choice.get("logprobs")
        if not logprobs or logprobs.get("token_logprobs") is None:
            raise TargetError("the server returned no logprobs for an echo request; it must support "
                              "`echo: true` with `logprobs` on /v1/completions")
        return logprobs

    def _span(self, choice: dict[str, Any], start: int, end: int) -> tuple[float, bool, int]:
        """(sum of logprobs, is greedy, number of tokens) of prompt tokens [start, end)."""
        logprobs = self._logprobs(choice)
        values = logprobs["token_logprobs"][start:end]
        tops = (logprobs.get("top_logprobs") or [None] * end)[start:end]
        if len(values) != end - start or any(v is None for v in values):
            raise TargetError(f"the server echoed {len(logprobs['token_logprobs'])} token logprobs; "
                              f"expected the prompt's tokens {start}..{end - 1} to be scored")
        is_greedy = all(top is not None and v >= max(top.values()) for v, top in zip(values, tops))
        return float(sum(values)), is_greedy, len(values)

    def _span_by_offset(self, choice: dict[str, Any], context_chars: int, prompt_chars: int,
                        ) -> tuple[float, bool, int]:
        logprobs = self._logprobs(choice)
        offsets = logprobs.get("text_offset")
        if offsets is None:
            raise TargetError("the server returned no text_offset: pass --tokenizer DIR to send token ids")
        indices = [i for i, off in enumerate(offsets) if context_chars <= off < prompt_chars]
        if not indices:
            raise TargetError("no echoed token starts inside the continuation; pass --tokenizer DIR")
        return self._span(choice, indices[0], indices[-1] + 1)

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        url = self.base_url + path
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")[:300]
            message = f"{method} {url}: HTTP {err.code}: {detail}"
            if err.code in RETRYABLE_HTTP:
                raise TransientError(message) from None
            raise TargetError(message) from None
        except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError) as err:
            raise TransientError(f"{method} {url}: {getattr(err, 'reason', err)}") from None
        except json.JSONDecodeError as err:
            raise TargetError(f"{method} {url}: the response is not JSON: {err}") from None
