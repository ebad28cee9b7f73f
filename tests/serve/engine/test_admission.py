"""The engine spec's bad-input list, at admission: each bad request is refused with an error naming the
field, leaves nothing behind (no sequence, no KV block, its request id free again), and the engine goes
on serving the requests it had and the ones that come after, with unchanged outputs. A draft model
with another vocabulary is engine configuration: refused by name when the engine is built."""

from __future__ import annotations

import json
import shutil

import pytest

from lifecycle.errors import ConfigError
from serve.engine.llm_engine import EngineConfig, LLMEngine
from serve.types import FinishReason, InvalidRequestError, SamplingParams

PROMPT = "class collections.OrderedDict"
GOOD = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
VOCAB_SIZE = 512  # the trained checkpoint's (conftest.py)


@pytest.fixture(scope="module")
def engine(trained_checkpoint) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(trained_checkpoint)))


@pytest.fixture(scope="module")
def expected(engine):
    return engine.generate([PROMPT], GOOD)[0].outputs[0].token_ids


# (what is bad, the field the error names, how the request is made)
BAD_REQUESTS = [
    ("prompt longer than the context", "prompt", lambda: ("x " * 600, SamplingParams())),
    ("prompt filling the context", "prompt", lambda: ([5] * 512, SamplingParams())),
    ("empty prompt text", "prompt", lambda: ("", SamplingParams())),
    ("empty prompt ids", "prompt", lambda: ([], SamplingParams())),
    ("max_tokens 0", "max_tokens", lambda: (PROMPT, SamplingParams(max_tokens=0))),
    ("max_tokens < 0", "max_tokens", lambda: (PROMPT, SamplingParams(max_tokens=-3))),
    ("temperature < 0", "temperature", lambda: (PROMPT, SamplingParams(temperature=-0.5))),
    ("top_p 0", "top_p", lambda: (PROMPT, SamplingParams(top_p=0.0))),
    ("top_p > 1", "top_p", lambda: (PROMPT, SamplingParams(top_p=1.5))),
    ("top_p < 0", "top_p", lambda: (PROMPT, SamplingParams(top_p=-0.1))),
    ("stop token id == vocab size", "stop_token_ids", lambda: (PROMPT, SamplingParams(stop_token_ids=[VOCAB_SIZE]))),
    ("stop token id far out", "stop_token_ids", lambda: (PROMPT, SamplingParams(stop_token_ids=[3, 10**6]))),
    ("prompt id outside the vocabulary", "prompt_token_ids", lambda: ([1, VOCAB_SIZE], SamplingParams())),
    ("params not SamplingParams", "params", lambda: (PROMPT, {"max_tokens": 4})),
    ("speculation forced on, no speculator", "speculative", lambda: (PROMPT, SamplingParams(speculative=True))),
]


@pytest.mark.parametrize("make_request,field", [(make, field) for _, field, make in BAD_REQUESTS],
                         ids=[name for name, _, _ in BAD_REQUESTS])
def test_bad_request_is_refused_by_field_and_the_engine_keeps_serving(engine, expected, make_request, field):
    engine.add_request("before", PROMPT, GOOD)
    (first,) = engine.step()  # "before" is running when the bad request arrives
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request("bad", *make_request())
    assert err.value.field == field and str(err.value).startswith(f"{field}: ")
    assert "bad" not in engine._seqs and not [s for s in engine.kv.seq_ids if s.startswith("bad")]
    engine.add_request("after", PROMPT, GOOD)
    engine.add_request("bad", PROMPT, GOOD)  # the refused request's id was never taken
    outputs = {"before": list(first.outputs[0].token_ids)}
    while engine.has_unfinished_requests():
        for ro in engine.step():
            outputs.setdefault(ro.request_id, []).extend(ro.outputs[0].token_ids)
            assert ro.outputs[0].finish_reason in (None, FinishReason.LENGTH)
    assert outputs == {"before": list(expected), "after": list(expected), "bad": list(expected)}
    assert engine.kv.usage == 0.0
    engine.kv.block_pool.check_invariants()


def test_prompt_longer_than_the_kv_pool_is_refused_naming_the_engines_context(trained_checkpoint):
    # 8 blocks of 16 hold 128 tokens: the engine's context is that, not the model's 512
    small = LLMEngine(EngineConfig(model=str(trained_checkpoint), num_kv_blocks=8))
    assert small.max_model_len == 128
    with pytest.raises(InvalidRequestError, match=r"^prompt: has 200 tokens; the model's context is 128"):
        small.add_request("long", [5] * 200, GOOD)
    clipped = small.generate([[5] * 127], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))[0]
    assert len(clipped.outputs[0].token_ids) == 1  # the last slot: max_tokens clipped, not refused
    assert small.generate([PROMPT], GOOD)[0].finished


def _draft_with(trained_checkpoint, out, edit_config=None, edit_tokenizer=None):
    """The target's files with config.json / tokenizer.json edited (no manifest: loads with a warning)."""
    shutil.copytree(trained_checkpoint, out, ignore=shutil.ignore_patterns("manifest.json"))
    for name, edit in (("config.json", edit_config), ("tokenizer.json", edit_tokenizer)):
        if edit is not None:
            (out / name).write_text(json.dumps(edit(json.loads((out / name).read_text()))))
    return out


def _swap_two_tokens(tokenizer: dict) -> dict:  # same size, another token -> id map
    vocab = tokenizer["model"]["vocab"]
    a, b = [t for t, i in vocab.items() if i in (300, 301)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    return tokenizer


@pytest.mark.parametrize("edits,message", [
    (dict(edit_tokenizer=_swap_two_tokens), "different tokenizer vocabulary"),
    (dict(edit_config=lambda c: {**c, "vocab_size": c["vocab_size"] + 64}), "vocab_size 576 in config.json"),
], ids=["token_to_id_map", "number_of_logits"])
def test_draft_with_another_vocabulary_is_refused_and_serving_goes_on(trained_checkpoint, engine, expected,
                                                                      tmp_path, edits, message):
    draft = _draft_with(trained_checkpoint, tmp_path / "draft", **edits)
    engine.add_request("running", PROMPT, GOOD)
    with pytest.raises(ConfigError, match=f"^draft_model: .*{message}"):
        LLMEngine(EngineConfig(model=str(trained_checkpoint), speculative_method="draft", draft_model=str(draft)))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs[-1].request_id == "running" and outputs[-1].finished
    assert sum((ro.outputs[0].token_ids for ro in outputs), ()) == expected
