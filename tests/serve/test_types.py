"""`serve.types`: SamplingParams validation (every field named), admission checks, the output types."""

from __future__ import annotations

import dataclasses
import math

import pytest

from lifecycle.errors import LmforgeError
from serve.types import (EngineStats, FinishReason, InvalidRequestError, Request, RequestOutput,
                         SamplingParams)

INVALID = [
    ("temperature", {"temperature": -0.1}),
    ("temperature", {"temperature": math.nan}),
    ("temperature", {"temperature": math.inf}),
    ("temperature", {"temperature": "1"}),
    ("temperature", {"temperature": True}),
    ("temperature", {"temperature": 10**400}),
    ("top_k", {"top_k": 0}),
    ("top_k", {"top_k": -1}),
    ("top_k", {"top_k": 2.5}),
    ("top_k", {"top_k": True}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 1.01}),
    ("top_p", {"top_p": -0.5}),
    ("top_p", {"top_p": math.nan}),
    ("min_p", {"min_p": -0.1}),
    ("min_p", {"min_p": 1.0}),
    ("repetition_penalty", {"repetition_penalty": 0.0}),
    ("repetition_penalty", {"repetition_penalty": -1.2}),
    ("presence_penalty", {"presence_penalty": 2.5}),
    ("presence_penalty", {"presence_penalty": -2.01}),
    ("frequency_penalty", {"frequency_penalty": 3}),
    ("frequency_penalty", {"frequency_penalty": -3}),
    ("seed", {"seed": -1}),
    ("seed", {"seed": 2**64}),
    ("seed", {"seed": 1.0}),
    ("max_tokens", {"max_tokens": 0}),
    ("max_tokens", {"max_tokens": -5}),
    ("max_tokens", {"max_tokens": 1.5}),
    ("max_tokens", {"max_tokens": None}),
    ("min_tokens", {"min_tokens": -1}),
    ("min_tokens", {"min_tokens": 5, "max_tokens": 4}),
    ("stop", {"stop": [""]}),
    ("stop", {"stop": ["x"] * 17}),
    ("stop", {"stop": [1]}),
    ("stop", {"stop": 5}),
    ("stop_token_ids", {"stop_token_ids": [-1]}),
    ("stop_token_ids", {"stop_token_ids": [1.5]}),
    ("stop_token_ids", {"stop_token_ids": [True]}),
    ("stop_token_ids", {"stop_token_ids": "12"}),
    ("ignore_eos", {"ignore_eos": 1}),
    ("n", {"n": 0}),
    ("n", {"n": 17}),
    ("logprobs", {"logprobs": -1}),
    ("logprobs", {"logprobs": 21}),
    ("prompt_logprobs", {"prompt_logprobs": 21}),
    ("speculative", {"speculative": "yes"}),
    ("skip_special_tokens", {"skip_special_tokens": None}),
    ("include_stop_str_in_output", {"include_stop_str_in_output": "true"}),
    ("include_stop_str_in_output", {"include_stop_str_in_output": 1}),
]


@pytest.mark.parametrize(("field", "kwargs"), INVALID, ids=[f"{f}={v}" for f, v in INVALID])
def test_every_invalid_field_raises_naming_it(field: str, kwargs: dict) -> None:
    with pytest.raises(InvalidRequestError) as excinfo:
        SamplingParams(**kwargs)
    assert excinfo.value.field == field
    assert str(excinfo.value).startswith(f"{field}:")
    assert isinstance(excinfo.value, ValueError) and isinstance(excinfo.value, LmforgeError)


def test_defaults_are_valid_and_sample_unfiltered() -> None:
    params = SamplingParams()
    assert (params.temperature, params.top_k, params.top_p, params.min_p) == (1.0, None, 1.0, 0.0)
    assert (params.max_tokens, params.min_tokens, params.n, params.logprobs) == (16, 0, 1, None)
    assert not params.is_greedy and not params.needs_penalties
    assert params.skip_special_tokens and not params.ignore_eos and params.speculative is None
    assert params.include_stop_str_in_output is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 0.5  # type: ignore[misc]
    hash(params)  # frozen and made of tuples: usable as a key


def test_boundary_values_are_accepted_and_normalised() -> None:
    params = SamplingParams(temperature=0, top_k=1, top_p=1, min_p=0.99, repetition_penalty=0.01,
                            presence_penalty=-2, frequency_penalty=2, seed=2**64 - 1, max_tokens=3,
                            min_tokens=3, stop="###", stop_token_ids=[0, 7], n=16, logprobs=0,
                            prompt_logprobs=20, speculative=False)
    assert isinstance(params.temperature, float) and isinstance(params.top_p, float)
    assert params.stop == ("###",) and params.stop_token_ids == (0, 7)
    assert params.is_greedy and params.needs_penalties
    assert [params.seed_for_completion(i) for i in range(2)] == [2**64 - 1, 0]
    assert SamplingParams(seed=5).seed_for_completion(3) == 8 and SamplingParams().seed_for_completion(1) is None


@pytest.mark.parametrize(("temperature", "is_greedy"), [(0.0, True), (1e-6, True), (1e-4, False), (2.0, False)])
def test_is_greedy_below_epsilon(temperature: float, is_greedy: bool) -> None:
    assert SamplingParams(temperature=temperature).is_greedy is is_greedy


@pytest.mark.parametrize(("field", "kwargs", "num_prompt_tokens"), [
    ("prompt", {}, 0),
    ("prompt", {}, 64),                            # == max_model_len: no room for one token
    ("prompt", {}, 65),
    ("stop_token_ids", {"stop_token_ids": [3, 100]}, 8),  # 100 == vocab_size
    ("logprobs", {"logprobs": 20}, 8),
    ("prompt_logprobs", {"prompt_logprobs": 20}, 8),
])
def test_validate_against_rejects_naming_the_field(field: str, kwargs: dict, num_prompt_tokens: int) -> None:
    vocab_size = 100 if field == "stop_token_ids" else 10
    with pytest.raises(InvalidRequestError) as excinfo:
        SamplingParams(**kwargs).validate_against(vocab_size, 64, num_prompt_tokens)
    assert excinfo.value.field == field


def test_validate_against_clips_max_tokens_to_the_context_left() -> None:
    params = SamplingParams(max_tokens=100, min_tokens=60, stop_token_ids=[99])
    assert params.validate_against(vocab_size=100, max_model_len=200, num_prompt_tokens=10) is params
    clipped = params.validate_against(vocab_size=100, max_model_len=64, num_prompt_tokens=10)
    assert (clipped.max_tokens, clipped.min_tokens) == (54, 54)
    last_slot = params.validate_against(vocab_size=100, max_model_len=64, num_prompt_tokens=63)
    assert (last_slot.max_tokens, last_slot.min_tokens) == (1, 1)


def test_request_is_immutable_and_validated_for_the_model() -> None:
    request = Request("r1", [5, 6, 7], SamplingParams(max_tokens=50), arrival_time_s=1.0)
    assert request.prompt_token_ids == (5, 6, 7) and request.num_prompt_tokens == 3
    assert request.priority == 0 and request.prompt_text is None
    admitted = request.validated_for(vocab_size=8, max_model_len=10)
    assert admitted.params.max_tokens == 7 and admitted.request_id == "r1"
    assert request.validated_for(vocab_size=8, max_model_len=100) is request
    with pytest.raises(InvalidRequestError) as excinfo:
        request.validated_for(vocab_size=7, max_model_len=100)
    assert excinfo.value.field == "prompt_token_ids" and "[7]" in str(excinfo.value)
    with pytest.raises(InvalidRequestError) as excinfo:
        Request("r2", [], SamplingParams(), arrival_time_s=0.0).validated_for(vocab_size=8, max_model_len=10)
    assert excinfo.value.field == "prompt"


@pytest.mark.parametrize(("field", "kwargs"), [
    ("request_id", {"request_id": ""}),
    ("prompt_token_ids", {"prompt_token_ids": [1, -2]}),
    ("prompt_token_ids", {"prompt_token_ids": "hello"}),
    ("priority", {"priority": 0.5}),
])
def test_request_rejects_malformed_fields(field: str, kwargs: dict) -> None:
    values = {"request_id": "r", "prompt_token_ids": [1], "params": SamplingParams(), "arrival_time_s": 0.0}
    with pytest.raises(InvalidRequestError) as excinfo:
        Request(**{**values, **kwargs})
    assert excinfo.value.field == field


def test_output_and_stats_types() -> None:
    output = RequestOutput("r1", outputs=(), finished=False, num_prompt_tokens=3)
    assert output.prompt_logprobs is None and output.ttft_s is None and output.num_cached_tokens == 0
    assert FinishReason("length") is FinishReason.LENGTH
    stats = EngineStats(prefix_cache_queries_tokens=200, prefix_cache_hits_tokens=150,
                        spec_draft_tokens_total=10, spec_accepted_tokens_total=7)
    assert stats.prefix_cache_hit_rate == 0.75 and stats.spec_acceptance_rate == 0.7
    assert EngineStats().prefix_cache_hit_rate == 0.0 and EngineStats().finished_requests == []
