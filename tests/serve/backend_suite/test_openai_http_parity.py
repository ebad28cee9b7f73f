"""The OpenAI-compatible HTTP API is the same over every backend: a greedy completion, a chat completion and the
log-likelihood request lm-eval sends (echo + logprobs) give the same answers."""

from __future__ import annotations

import json
import urllib.request

import pytest

from serve.api.openai_http import OpenAIApi

from .conftest import REFERENCE, supports


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())


def _answers(suite_server) -> dict:
    server = suite_server.server
    base = server.serve_http(OpenAIApi(server.backend, server.server.admission).app()) + "/v1"
    model = suite_server.backend.model_info().name
    completion = _post(f"{base}/completions", dict(model=model, prompt="Return the", max_tokens=8, temperature=0))
    chat = _post(f"{base}/chat/completions", dict(model=model, max_tokens=6, temperature=0,
                                                  messages=[{"role": "user", "content": "What does it return?"}]))
    scored = None
    if supports(suite_server, "prompt_logprobs"):  # echo + logprobs scores the prompt
        scored = _post(f"{base}/completions", dict(model=model, prompt="import os\nimport sys", max_tokens=1,
                                                   temperature=0, echo=True, logprobs=1))
    # Prefix-cache hits (usage.prompt_tokens_details.cached_tokens) depend on each engine's KV block size (vLLM's
    # CPU blocks hold 128 tokens, ours 16), so they are not compared.
    usage = lambda body: {k: v for k, v in body["usage"].items() if k != "prompt_tokens_details"}  # noqa: E731
    return {"text": completion["choices"][0]["text"], "usage": usage(completion),
            "chat": chat["choices"][0]["message"]["content"], "chat_usage": usage(chat),
            "echo_logprobs": scored["choices"][0]["logprobs"]["token_logprobs"] if scored else None}


def test_openai_api_answers_agree(all_servers):
    answers = {name: _answers(s) for name, s in all_servers.items()}
    ref = answers[REFERENCE]
    for name, got in answers.items():
        assert (got["text"], got["usage"], got["chat"], got["chat_usage"]) == \
               (ref["text"], ref["usage"], ref["chat"], ref["chat_usage"]), name
        if got["echo_logprobs"] is None:
            continue
        assert got["echo_logprobs"][0] is None and ref["echo_logprobs"][0] is None
        assert got["echo_logprobs"][1:] == pytest.approx(ref["echo_logprobs"][1:], abs=2e-3), name
