"""The OpenAI-compatible HTTP API through the official `openai` SDK, on the trained tiny checkpoint: the same
tokens as the gRPC API, echo + logprobs equal to the engine's prompt logprobs (lm-eval's log-likelihood
request), chat streaming, and bad input answered with 400 naming the field."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from serve.api.openai_http import OpenAIApi
from serve.types import FinishReason

from .conftest import wait_engine_idle

PROMPT = "Return the"


def http(method: str, url: str, body: dict | bytes | None = None) -> tuple[int, dict]:
    """(status, JSON body) of one plain HTTP request: what a client without the SDK sees."""
    data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def base_url(server) -> str:
    return server.serve_http(OpenAIApi(server.backend, server.server.admission).app()) + "/v1"


@pytest.fixture(scope="module")
def oai(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(oai) -> str:
    (entry,) = oai.models.list().data
    return entry.id


def test_models_lists_the_served_checkpoint(oai, model, trained_checkpoint):
    assert model == trained_checkpoint.name


def test_completion_gives_the_grpc_tokens(oai, model, client):
    want = client.generate(PROMPT, temperature=0, max_tokens=8, ignore_eos=True)
    got = oai.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=8,
                                 extra_body={"ignore_eos": True})
    (choice,) = got.choices
    assert choice.text == want.completions[0].text and choice.finish_reason == "length"
    assert got.usage.prompt_tokens == want.usage.prompt_tokens and got.usage.completion_tokens == 8
    assert got.usage.total_tokens == got.usage.prompt_tokens + 8 and got.object == "text_completion"


def test_every_prompt_form_gives_the_same_greedy_text(oai, model, client):
    ids = client.tokenize(PROMPT)
    other = "def main"
    texts = {}
    for name, prompt in [("text", PROMPT), ("ids", ids), ("texts", [PROMPT, other]),
                         ("id lists", [ids, client.tokenize(other)])]:
        reply = oai.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=6, n=2)
        assert [c.index for c in reply.choices] == list(range(len(reply.choices)))
        texts[name] = [c.text for c in reply.choices]
    first = texts["text"][0]
    assert texts["text"] == texts["ids"] == [first, first]  # greedy: n copies agree
    assert texts["texts"] == texts["id lists"] and texts["texts"][:2] == [first, first]


def test_echo_logprobs_are_the_engines_prompt_logprobs(oai, model, client):
    """lm-eval's local-completions log-likelihood request: token ids, echo, logprobs=1, max_tokens=1, greedy."""
    ids = client.tokenize("The quick brown fox jumps over the lazy dog")
    engine = client.generate(ids, temperature=0, max_tokens=1, prompt_logprobs=1, logprobs=1)
    reply = oai.completions.create(model=model, prompt=[ids], echo=True, logprobs=1, max_tokens=1, temperature=0,
                                   seed=1234)
    (choice,) = reply.choices
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = [p.chosen.logprob for p in engine.prompt_logprobs[1:]] + [engine.completions[0].logprobs[0].chosen.logprob]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-5)
    assert lp.tokens[0] == client.detokenize(ids[:1], skip_special_tokens=False)
    assert choice.text == client.detokenize(ids) + engine.completions[0].text
    for position, token, logprob, top in zip(engine.prompt_logprobs[1:], lp.tokens[1:], lp.token_logprobs[1:],
                                             lp.top_logprobs[1:]):
        assert top[token] == logprob  # the chosen token is always among top_logprobs
        # lm-eval's is_greedy: the chosen token's logprob is the largest shown.
        assert (logprob == max(top.values())) == (position.chosen.rank == 1)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_echo_with_max_tokens_zero_scores_the_prompt_only(oai, model, client):
    ids = client.tokenize(PROMPT)
    reply = oai.completions.create(model=model, prompt=ids, echo=True, logprobs=0, max_tokens=0)
    (choice,) = reply.choices
    assert choice.text == client.detokenize(ids) and len(choice.logprobs.tokens) == len(ids)
    assert reply.usage.completion_tokens == 0 and choice.finish_reason == "length"


def test_completion_stream_adds_up_to_the_whole(oai, model):
    whole = oai.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=10, logprobs=2)
    chunks = list(oai.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=10, logprobs=2,
                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    streamed_lp = [x for c in chunks if c.choices for x in c.choices[0].logprobs.token_logprobs]
    assert streamed_lp == whole.choices[0].logprobs.token_logprobs
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_streams_what_it_answers_whole(oai, model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
    whole = oai.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=12,
                                        logprobs=True, top_logprobs=2)
    (choice,) = whole.choices
    assert choice.message.role == "assistant" and whole.object == "chat.completion"
    assert len(choice.logprobs.content) == whole.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    chunks = list(oai.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=12,
                                              stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(d.content or "" for d in deltas) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize("body, field", [
    (dict(prompt=PROMPT, temperature=-1), "temperature"),
    (dict(prompt=PROMPT, top_p=0), "top_p"),
    (dict(prompt=PROMPT, max_tokens=0), "max_tokens"),
    (dict(prompt=PROMPT, max_tokens="many"), "max_tokens"),
    (dict(prompt=PROMPT, logprobs=21), "logprobs"),
    (dict(prompt=PROMPT, n=0), "n"),
    (dict(prompt=PROMPT, stop=[""]), "stop"),
    (dict(prompt=PROMPT, echo="yes"), "echo"),
    (dict(prompt=PROMPT, best_of=3), "best_of"),
    (dict(prompt=PROMPT, logit_bias={"5": 100}), "logit_bias"),
    (dict(prompt=PROMPT, stream_options={"include_usage": True}), "stream_options"),
    (dict(prompt=[]), "prompt"),
    (dict(prompt=""), "prompt"),
    (dict(prompt=[1, "two"]), "prompt"),
    (dict(prompt=[[1, 2], [3, -4]]), "prompt[1]"),
    (dict(prompt=[1, 10**6]), "prompt"),
    (dict(prompt=[5] * 600), "prompt"),
    (dict(prompt=PROMPT, model="gpt-nonexistent"), "model"),
])
def test_bad_completion_requests_name_the_field(base_url, model, body, field):
    status, reply = http("POST", f"{base_url}/completions", {"model": model, **body})
    error = reply["error"]
    assert status == (404 if field == "model" else 400), error
    assert error["param"] == field and error["message"].startswith(f"{field}:"), error


@pytest.mark.parametrize("body, field", [
    (dict(messages=[{"role": "robot", "content": "hi"}]), "messages[0].role"),
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), "messages[0].content[0]"),
    (dict(messages=[{"role": "user", "content": "hi"}], top_logprobs=2), "top_logprobs"),
    (dict(messages=[{"role": "user", "content": "hi"}], max_completion_tokens=-3), "max_completion_tokens"),
    (dict(messages=[{"role": "user", "content": "hi"}], tools=[{"type": "function"}]), "tools"),
])
def test_bad_chat_requests_name_the_field(base_url, model, body, field):
    status, reply = http("POST", f"{base_url}/chat/completions", {"model": model, **body})
    assert status == 400 and reply["error"]["param"] == field, reply


def test_sdk_sees_bad_request_error_with_param(oai, model):
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model=model, prompt=PROMPT, temperature=-1)
    assert err.value.param == "temperature"


def test_garbage_body_and_unknown_route(base_url):
    status, reply = http("POST", f"{base_url}/completions", b"{not json")
    assert status == 400 and "not valid JSON" in reply["error"]["message"]
    status, reply = http("GET", f"{base_url}/nowhere")
    assert status == 404 and "error" in reply


def test_disconnecting_a_stream_aborts_the_request(base_url, model, server):
    finished = []
    server.backend.add_stats_listener(lambda stats: finished.extend(stats.finished_requests))
    body = {"model": model, "prompt": PROMPT, "max_tokens": 400, "n": 8, "ignore_eos": True, "stream": True}
    request = urllib.request.Request(f"{base_url}/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        first = next(line for line in reply if line.startswith(b"data: "))
        assert json.loads(first.removeprefix(b"data: "))["choices"][0]["text"] is not None
    wait_engine_idle(server.engine)  # the engine aborted the request and freed its KV blocks
    with server.client() as client:  # the engine reports aborts with its next step's stats
        client.generate("Return", max_tokens=1)
    mine = [f for f in finished if f.request_id.startswith("cmpl-")]
    assert len(mine) == 8 and all(f.finish_reason is FinishReason.ABORT for f in mine)
    assert all(f.num_generation_tokens < 400 for f in mine)


def test_bearer_token_and_loading_state(server, start_server, model):
    guarded = openai.OpenAI(base_url=server.serve_http(OpenAIApi(server.backend, server.server.admission,
                                                                 auth_token="s3cret").app()) + "/v1",
                            api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        guarded.models.list()
    assert guarded.with_options(api_key="s3cret").models.list().data[0].id == model
    loading = start_server(load=False)
    url = loading.serve_http(OpenAIApi(loading.backend, loading.server.admission).app())
    assert http("GET", f"{url}/health")[0] == 503
    status, reply = http("POST", f"{url}/v1/completions", {"prompt": PROMPT})
    assert status == 503 and "loading" in reply["error"]["message"]
