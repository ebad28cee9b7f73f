"""Generate / GenerateStream / chat through the real server give what the engine gives in-process."""

from __future__ import annotations

import pytest

from serve.api._gen.lmforge.v1 import generation_pb2
from serve.types import FinishReason, SamplingParams

from .conftest import engine_config

PROMPTS = ["class collections.OrderedDict", "Return the", "os.path.join(a, *p)"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def reference(trained_checkpoint):
    """The same checkpoint in an in-process engine: what the server must reproduce."""
    from serve.engine.llm_engine import LLMEngine

    return LLMEngine(engine_config(trained_checkpoint))


def test_unary_and_stream_greedy_equal_the_engine(client, reference):
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = reference.generate(PROMPTS, greedy)
    for prompt, ref in zip(PROMPTS, expected):
        ref_ids = list(ref.outputs[0].token_ids)
        reply = client.generate(prompt, temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, request_id="mine")
        assert reply.request_id == "mine" and reply.finished
        (completion,) = reply.completions
        assert list(completion.token_ids) == ref_ids
        assert completion.text == ref.outputs[0].text
        assert completion.finish_reason == generation_pb2.FINISH_REASON_LENGTH
        assert reply.usage.prompt_tokens == ref.num_prompt_tokens
        assert reply.usage.completion_tokens == MAX_TOKENS
        assert reply.timings.HasField("ttft_s") and reply.timings.HasField("total_s")

        chunks = list(client.stream(prompt, temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
        assert [c.finished for c in chunks] == [False] * (len(chunks) - 1) + [True]
        assert [t for c in chunks for comp in c.completions for t in comp.token_ids] == ref_ids
        assert "".join(comp.text for c in chunks for comp in c.completions) == ref.outputs[0].text
        assert chunks[-1].usage.completion_tokens == MAX_TOKENS
        assert chunks[-1].completions[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH


def test_token_id_prompt_n_seed_and_logprobs(client, reference):
    prompt_ids = client.tokenize("Return the")
    params = dict(temperature=0.8, seed=7, n=2, max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    reply = client.generate(prompt_ids, **params)
    ref = reference.generate([prompt_ids], SamplingParams(**params))[0]
    assert [list(c.token_ids) for c in reply.completions] == [list(c.token_ids) for c in ref.outputs]
    for completion, ref_completion in zip(reply.completions, ref.outputs):
        assert len(completion.logprobs) == 6
        for got, want in zip(completion.logprobs, ref_completion.logprobs):
            assert got.chosen.token_id == want.chosen.token_id
            assert got.chosen.logprob == pytest.approx(want.chosen.logprob, abs=1e-4)
            assert got.chosen.rank == want.chosen.rank and got.chosen.text != ""
            assert [t.token_id for t in got.top] == [t.token_id for t in want.top]
    # Prompt logprobs: one entry per prompt token, the first empty (nothing predicts it).
    assert list(reply.prompt_token_ids) == prompt_ids
    assert len(reply.prompt_logprobs) == len(prompt_ids) and not reply.prompt_logprobs[0].HasField("chosen")
    for position, token_id, want in zip(reply.prompt_logprobs[1:], prompt_ids[1:], ref.prompt_logprobs[1:]):
        assert position.chosen.token_id == token_id and len(position.top) == 2
        assert position.chosen.logprob == pytest.approx(want.chosen.logprob, abs=1e-4)


def test_stop_string_and_stop_token(client, reference):
    ref = reference.generate(["Return the"], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))[0]
    ids, text = list(ref.outputs[0].token_ids), ref.outputs[0].text
    stop_id = ids[3]
    reply = client.generate("Return the", temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True,
                            stop_token_ids=[stop_id])
    (completion,) = reply.completions
    assert completion.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert completion.stop_token_id == stop_id and list(completion.token_ids) == ids[:ids.index(stop_id) + 1]
    stop = text.strip()[-3:]
    if stop:
        reply = client.generate("Return the", temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, stop=[stop])
        (completion,) = reply.completions
        assert completion.finish_reason == generation_pb2.FINISH_REASON_STOP_STRING
        assert completion.stop_string == stop and stop not in completion.text


def test_chat_renders_the_checkpoint_template(client, reference, trained_checkpoint):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Return the"}]
    tokenizer = AutoTokenizer.from_pretrained(trained_checkpoint)
    rendered = tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                                add_special_tokens=False)
    assert client.tokenize(messages) == rendered
    ref = reference.generate([rendered], SamplingParams(temperature=0.0, max_tokens=8))[0]
    reply = client.generate(messages, temperature=0, max_tokens=8)
    assert list(reply.completions[0].token_ids) == list(ref.outputs[0].token_ids)
    assert reply.usage.prompt_tokens == len(rendered)
    expected_reason = {FinishReason.STOP: generation_pb2.FINISH_REASON_STOP,
                       FinishReason.LENGTH: generation_pb2.FINISH_REASON_LENGTH}[ref.outputs[0].finish_reason]
    assert reply.completions[0].finish_reason == expected_reason


def test_model_info_tokenize_detokenize(client, server, trained_checkpoint):
    import json

    info = client.model_info()
    assert info.name == trained_checkpoint.name and info.architecture == "LlamaForCausalLM"
    assert info.model_type == "llama" and info.vocab_size == 512 and info.max_model_len == 512
    assert info.backend == "native" and info.has_chat_template and info.dtype == "float32"
    assert json.loads(info.manifest_json)["recipe"] == "pretrain" and info.quantization_json == ""
    assert info.speculative.method == ""
    ids = client.tokenize("os.path.join(a, *p)")
    assert client.detokenize(ids) == "os.path.join(a, *p)"
    assert client.detokenize([0, *ids], skip_special_tokens=False).startswith("<|endoftext|>")
