"""`sampling.include_stop_str_in_output` through the real gRPC server (unary and streamed) and the OpenAI API:
the text keeps the matched stop string when asked, is cut before it otherwise, and equals the engine's."""

from __future__ import annotations

import pytest

from serve.api._gen.lmforge.v1 import generation_pb2
from serve.api.openai_http import OpenAIApi
from serve.types import SamplingParams

from .conftest import engine_config

PROMPT = "Return the"
MAX_TOKENS = 24
# Seeded sampling (the tiny model's greedy text is mostly blanks): the server and the engine draw the same tokens.
SAMPLING = dict(temperature=1.0, seed=11, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(trained_checkpoint):
    from serve.engine.llm_engine import LLMEngine

    return LLMEngine(engine_config(trained_checkpoint))


@pytest.fixture(scope="module")
def stop(reference) -> tuple[str, int]:
    """A 3-character stop string from the middle of the sampled text, and where it first occurs."""
    text = reference.generate([PROMPT], SamplingParams(**SAMPLING))[0].outputs[0].text
    for start in range(len(text) // 2, len(text) - 3):
        candidate = text[start:start + 3]
        if candidate.strip() and text.find(candidate) > 0:
            return candidate, text.find(candidate)
    pytest.fail(f"no usable stop string in the sampled text {text!r}")


@pytest.mark.parametrize("include", [True, False])
def test_grpc_keeps_or_cuts_the_stop_string_as_the_engine_does(client, reference, stop, include):
    stop_str, at = stop
    params = dict(SAMPLING, stop=[stop_str])
    want = reference.generate([PROMPT], SamplingParams(**params, include_stop_str_in_output=include))[0].outputs[0]
    reply = client.generate(PROMPT, include_stop_str_in_output=include, **params)
    (completion,) = reply.completions
    assert completion.finish_reason == generation_pb2.FINISH_REASON_STOP_STRING and completion.stop_string == stop_str
    assert completion.text == want.text and list(completion.token_ids) == list(want.token_ids)
    full = want.text if include else want.text + stop_str
    assert completion.text == (full[:at + 3] if include else full[:at])
    assert completion.text.endswith(stop_str) is include
    chunks = list(client.stream(PROMPT, include_stop_str_in_output=include, **params))
    assert "".join(c.text for chunk in chunks for c in chunk.completions) == completion.text


def test_unset_is_false(client, stop):
    stop_str, at = stop
    reply = client.generate(PROMPT, stop=[stop_str], **SAMPLING)
    assert not reply.completions[0].text.endswith(stop_str) and len(reply.completions[0].text) == at


def test_openai_completions_accept_it(server, client, stop):
    import openai

    stop_str, _ = stop
    base_url = server.serve_http(OpenAIApi(server.backend, server.server.admission).app()) + "/v1"
    oai = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    model = oai.models.list().data[0].id
    for include in (True, False):
        got = oai.completions.create(model=model, prompt=PROMPT, temperature=1.0, seed=SAMPLING["seed"],
                                     max_tokens=MAX_TOKENS, stop=[stop_str],
                                     extra_body={"ignore_eos": True, "include_stop_str_in_output": include})
        want = client.generate(PROMPT, stop=[stop_str], include_stop_str_in_output=include, **SAMPLING)
        assert got.choices[0].text == want.completions[0].text and got.choices[0].finish_reason == "stop"
        assert got.choices[0].text.endswith(stop_str) is include
    with pytest.raises(openai.BadRequestError, match="include_stop_str_in_output"):
        oai.completions.create(model=model, prompt=PROMPT, max_tokens=4,
                               extra_body={"include_stop_str_in_output": "yes"})
