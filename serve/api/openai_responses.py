"""RequestOutput deltas -> OpenAI response JSON: completion and chat choices, streamed or whole, and usage.

One assembler per HTTP request. `deltas(prompt_index, out)` turns one engine delta into choice deltas
(choice index = prompt_index * n + completion index, as OpenAI numbers a batch); a streaming response
sends each as a chunk, a whole response merges them (`merge_*`).

Completion logprobs are OpenAI's legacy shape, the one lm-evaluation-harness reads:
`{"tokens": [...], "token_logprobs": [...], "top_logprobs": [{text: logprob}, ...], "text_offset": [...]}`.
With echo the prompt's tokens come first and its first token has `null` logprob and top (nothing predicts
it); each position's `top_logprobs` holds the top-N alternatives plus the chosen token, so "is this token
the greedy one" is `token_logprob == max(top_logprobs.values())`. `text_offset` is each token's start in
the choice's `text` (a running sum of the tokens' texts).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from serve.api.openai_requests import ChatRequest, CompletionRequest, Prompt
from serve.backends.base import Backend
from serve.types import FinishReason, Logprobs, RequestOutput, TokenLogprob

FINISH_REASONS = {FinishReason.STOP: "stop", FinishReason.STOP_STRING: "stop", FinishReason.LENGTH: "length",
                  FinishReason.ABORT: "abort", FinishReason.ERROR: "error"}


class _Usage:
    def __init__(self) -> None:
        self.prompt_tokens: dict[int, int] = {}  # per prompt: a prompt counts once whatever n is
        self.cached_tokens: dict[int, int] = {}
        self.completion_tokens = 0

    def add(self, prompt_index: int, out: RequestOutput, num_completion_tokens: int) -> None:
        self.prompt_tokens[prompt_index] = out.num_prompt_tokens
        self.cached_tokens[prompt_index] = out.num_cached_tokens
        self.completion_tokens += num_completion_tokens

    def json(self) -> dict[str, Any]:
        prompt = sum(self.prompt_tokens.values())
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": sum(self.cached_tokens.values())}}


class _TokenTexts:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def __call__(self, entry: TokenLogprob) -> str:
        if entry.text is not None:
            return entry.text
        return self.backend.detokenize([entry.token_id], skip_special_tokens=False)


class CompletionAssembler:
    def __init__(self, request: CompletionRequest, backend: Backend) -> None:
        self.request = request
        self.backend = backend
        self.n = request.params.n
        self.usage = _Usage()
        self._text_of = _TokenTexts(backend)
        self._offsets: dict[int, int] = {}  # choice index -> length of its text so far
        self._echoed: set[int] = set()  # prompts whose echo went out

    def deltas(self, prompt_index: int, out: RequestOutput) -> list[dict[str, Any]]:
        req = self.request
        choices = []
        if req.echo and prompt_index not in self._echoed:
            self._echoed.add(prompt_index)
            choices.extend(self._echo(prompt_index, req.prompts[prompt_index], out.prompt_logprobs))
        num_tokens = 0
        for c in out.outputs:
            index = prompt_index * self.n + c.index
            finish = FINISH_REASONS[c.finish_reason] if c.finish_reason is not None else None
            if req.echo_only:  # the one token generated to run the request is not part of the answer
                if finish is not None:
                    choices.append(self._choice(index, "", [] if req.num_logprobs is not None else None, "length"))
                continue
            num_tokens += len(c.token_ids)
            entries = None
            if req.num_logprobs is not None:
                entries = [(lp.chosen, lp) for lp in c.logprobs or ()]
            choices.append(self._choice(index, c.text, entries, finish))
        self.usage.add(prompt_index, out, num_tokens)
        return choices

    def _echo(self, prompt_index: int, prompt: Prompt, prompt_logprobs: Sequence[Logprobs | None] | None,
              ) -> list[dict[str, Any]]:
        text = prompt.text if prompt.text is not None else self.backend.detokenize(
            prompt.token_ids, skip_special_tokens=self.request.params.skip_special_tokens)
        entries = None
        if self.request.num_logprobs is not None:
            # The engine sends prompt logprobs in a request's first delta; position 0 is None (nothing
            # predicts the first token): only its text is shown, its logprob and top are null.
            first = TokenLogprob(token_id=prompt.token_ids[0], logprob=0.0)
            positions = list(prompt_logprobs or ())
            entries = [(first, None)] + [(p.chosen, p) for p in positions[1:] if p is not None]
        return [self._choice(prompt_index * self.n + j, text, entries, None) for j in range(self.n)]

    def _choice(self, index: int, text: str, entries: list | None, finish: str | None) -> dict[str, Any]:
        logprobs = None
        if entries is not None:
            logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            offset = self._offsets.get(index, 0)
            for chosen, position in entries:
                token = self._text_of(chosen)
                logprobs["tokens"].append(token)
                logprobs["text_offset"].append(offset)
                offset += len(token)
                if position is None:  # the prompt's first token
                    logprobs["token_logprobs"].append(None)
                    logprobs["top_logprobs"].append(None)
                    continue
                logprobs["token_logprobs"].append(chosen.logprob)
                top = {self._text_of(t): t.logprob for t in reversed(position.top)}  # equal texts: likeliest wins
                top.setdefault(token, chosen.logprob)
                logprobs["top_logprobs"].append(top)
        self._offsets[index] = self._offsets.get(index, 0) + len(text)
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def merge_completion_choices(deltas: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold a whole response's choice deltas into one choice per index."""
    merged: dict[int, dict[str, Any]] = {}
    for d in deltas:
        choice = merged.get(d["index"])
        if choice is None:
            merged[d["index"]] = {**d, "logprobs": _copy_logprobs(d["logprobs"])}
            continue
        choice["text"] += d["text"]
        if d["logprobs"] is not None:
            for key, values in d["logprobs"].items():
                choice["logprobs"][key].extend(values)
        choice["finish_reason"] = d["finish_reason"] or choice["finish_reason"]
    return [merged[i] for i in sorted(merged)]


def _copy_logprobs(logprobs: dict[str, list] | None) -> dict[str, list] | None:
    return None if logprobs is None else {key: list(values) for key, values in logprobs.items()}


class ChatAssembler:
    def __init__(self, request: ChatRequest, backend: Backend) -> None:
        self.request = request
        self.usage = _Usage()
        self._text_of = _TokenTexts(backend)
        self._started: set[int] = set()

    def deltas(self, out: RequestOutput) -> list[dict[str, Any]]:
        choices = []
        num_tokens = 0
        for c in out.outputs:
            num_tokens += len(c.token_ids)
            delta: dict[str, Any] = {"content": c.text}
            if c.index not in self._started:
                self._started.add(c.index)
                delta = {"role": "assistant", **delta}
            logprobs = None
            if self.request.num_top_logprobs is not None:
                logprobs = {"content": [self._token_logprob(lp) for lp in c.logprobs or ()]}
            finish = FINISH_REASONS[c.finish_reason] if c.finish_reason is not None else None
            choices.append({"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
        self.usage.add(0, out, num_tokens)
        return choices

    def _token_logprob(self, position: Logprobs) -> dict[str, Any]:
        def entry(t: TokenLogprob) -> dict[str, Any]:
            text = self._text_of(t)
            return {"token": text, "logprob": t.logprob, "bytes": list(text.encode("utf-8"))}

        return {**entry(position.chosen),
                "top_logprobs": [entry(t) for t in position.top[:self.request.num_top_logprobs]]}


def merge_chat_choices(deltas: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    merged: dict[int, dict[str, Any]] = {}
    for d in deltas:
        choice = merged.setdefault(d["index"], {"index": d["index"], "message": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None})
        choice["message"]["content"] += d["delta"]["content"]
        if d["logprobs"] is not None:
            choice["logprobs"] = choice["logprobs"] or {"content": []}
            choice["logprobs"]["content"].extend(d["logprobs"]["content"])
        choice["finish_reason"] = d["finish_reason"] or choice["finish_reason"]
    return [merged[i] for i in sorted(merged)]
