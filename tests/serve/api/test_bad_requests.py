"""Bad requests are answered INVALID_ARGUMENT naming the field, while a stream runs on undisturbed."""

from __future__ import annotations

import json
import shutil

import grpc
import pytest

from serve.api._gen.lmforge.v1 import common_pb2, generation_pb2, model_pb2, scoring_pb2
from serve.client import generate_request

GENERATE = "/lmforge.v1.Generation/Generate"


def _chat(*roles_and_contents) -> dict:
    return dict(chat=common_pb2.Chat(messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in roles_and_contents]))


# (what is wrong, request fields, the field path the answer must name)
BAD_GENERATE = [
    ("negative temperature", dict(text="x", sampling=dict(temperature=-1.0)), "sampling.temperature"),
    ("top_k 0", dict(text="x", sampling=dict(top_k=0)), "sampling.top_k"),
    ("top_p > 1", dict(text="x", sampling=dict(top_p=1.5)), "sampling.top_p"),
    ("min_p 1", dict(text="x", sampling=dict(min_p=1.0)), "sampling.min_p"),
    ("repetition penalty 0", dict(text="x", sampling=dict(repetition_penalty=0.0)), "sampling.repetition_penalty"),
    ("presence penalty 3", dict(text="x", sampling=dict(presence_penalty=3.0)), "sampling.presence_penalty"),
    ("NaN frequency penalty", dict(text="x", sampling=dict(frequency_penalty=float("nan"))), "sampling.frequency_penalty"),
    ("max_tokens 0", dict(text="x", sampling=dict(max_tokens=0)), "sampling.max_tokens"),
    ("min_tokens > max_tokens", dict(text="x", sampling=dict(max_tokens=2, min_tokens=3)), "sampling.min_tokens"),
    ("n 17", dict(text="x", sampling=dict(n=17)), "sampling.n"),
    ("logprobs 21", dict(text="x", sampling=dict(logprobs=21)), "sampling.logprobs"),
    ("prompt_logprobs -1", dict(text="x", sampling=dict(prompt_logprobs=-1)), "sampling.prompt_logprobs"),
    ("empty stop string", dict(text="x", sampling=dict(stop=["a", ""])), "sampling.stop"),
    ("17 stop strings", dict(text="x", sampling=dict(stop=["s"] * 17)), "sampling.stop"),
    ("negative stop id", dict(text="x", sampling=dict(stop_token_ids=[-1])), "sampling.stop_token_ids"),
    ("stop id past the vocabulary", dict(text="x", sampling=dict(stop_token_ids=[512])), "sampling.stop_token_ids"),
    ("huge stop_token_ids", dict(text="x", sampling=dict(stop_token_ids=list(range(100_000)))), "sampling.stop_token_ids"),
    ("no prompt", dict(), "prompt"),
    ("empty text", dict(text=""), "text"),
    ("token id past the vocabulary", dict(token_ids=common_pb2.TokenIds(ids=[5, 512])), "token_ids"),
    ("negative token id", dict(token_ids=common_pb2.TokenIds(ids=[-3])), "token_ids"),
    ("prompt longer than the context", dict(token_ids=common_pb2.TokenIds(ids=[5] * 600)), "token_ids"),
    ("huge prompt", dict(token_ids=common_pb2.TokenIds(ids=[5] * 1_000_000)), "token_ids"),
    ("unknown chat role", _chat(("user", "hi"), ("robot", "beep")), "chat.messages[1].role"),
    ("empty chat", _chat(), "chat.messages"),
    ("huge chat", _chat(*[("user", "hi")] * 5000), "chat.messages"),
    ("huge request id", dict(text="x", request_id="r" * 10_000), "request_id"),
]


def _raw_call(client, method: str, payload: bytes):
    call = client.channel.unary_unary(method)  # no serializers: bytes go out as they are
    return call(payload, timeout=30)


def _expect_invalid(call, field: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith(f"{field}: "), err.value.details()


def _bad_utf8(message, marker: bytes) -> bytes:
    return message.SerializeToString().replace(marker, b"\xc3\x28")


def test_battery_of_bad_requests_while_a_stream_runs(client):
    stream = client.stream("Return the", temperature=0, max_tokens=300, ignore_eos=True)
    first = next(stream)
    for what, fields, field in BAD_GENERATE:
        request = generation_pb2.GenerateRequest(**fields)
        _expect_invalid(lambda: client.generation.Generate(request, timeout=30), field)
        _expect_invalid(lambda: list(client.generation.GenerateStream(request, timeout=30)), field)
    raw = [
        (GENERATE, b"\xff\xff\xff\xff garbage", "request"),
        (GENERATE, _bad_utf8(generation_pb2.GenerateRequest(text="XX"), b"XX"), "text"),
        (GENERATE, _bad_utf8(generation_pb2.GenerateRequest(**_chat(("user", "XX"))), b"XX"), "chat.messages[0].content"),
        (GENERATE, _bad_utf8(generate_request("hi", stop=["XX"]), b"XX"), "sampling.stop[0]"),
        ("/lmforge.v1.Model/Tokenize", _bad_utf8(model_pb2.TokenizeRequest(text="XX"), b"XX"), "text"),
    ]
    for method, payload, field in raw:
        _expect_invalid(lambda: _raw_call(client, method, payload), field)
    bad_scores = [
        (dict(), "loglikelihood"),
        (dict(loglikelihood=[scoring_pb2.LoglikelihoodQuery(context=common_pb2.TextOrTokens(text="a"))]),
         "loglikelihood[0].continuations"),
        (dict(loglikelihood=[scoring_pb2.LoglikelihoodQuery(continuations=[common_pb2.TextOrTokens(text="a")])]),
         "loglikelihood[0].context"),
        (dict(rolling=[scoring_pb2.RollingQuery(text=common_pb2.TextOrTokens(tokens=common_pb2.TokenIds(ids=[9999])))]),
         "rolling[0].text"),
        (dict(rolling=[scoring_pb2.RollingQuery(text=common_pb2.TextOrTokens(text=""))]), "rolling[0].text"),
    ]
    for fields, field in bad_scores:
        _expect_invalid(lambda: client.scoring.Score(scoring_pb2.ScoreRequest(**fields), timeout=30), field)
    _expect_invalid(lambda: client.detokenize([1, 512]), "token_ids")
    _expect_invalid(lambda: client.model.Tokenize(model_pb2.TokenizeRequest(), timeout=30), "input")

    rest = list(stream)  # the stream saw none of it
    assert rest[-1].finished and rest[-1].completions[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert sum(len(c.token_ids) for chunk in [first, *rest] for c in chunk.completions) == 300
    assert client.generate("Return the", max_tokens=2).finished  # and the server still serves


def test_chat_with_a_template_less_checkpoint_is_invalid_argument(start_server, trained_checkpoint, tmp_path):
    plain = tmp_path / "no-template"
    shutil.copytree(trained_checkpoint, plain)
    (plain / "manifest.json").unlink()  # a plain transformers directory: edited files, no hashes to match
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config_path = plain / "tokenizer_config.json"
    config_path.write_text(json.dumps({k: v for k, v in json.loads(config_path.read_text()).items()
                                       if k != "chat_template"}))
    with start_server(checkpoint=plain).client() as client:
        assert not client.model_info().has_chat_template
        for call in (lambda: client.generate([("user", "hi")]), lambda: client.tokenize([("user", "hi")])):
            _expect_invalid(call, "chat")
        assert client.generate("Return the", max_tokens=2).finished
