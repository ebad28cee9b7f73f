"""Our SamplingParams -> vLLM's, field by field, against vLLM's own SamplingParams (it validates what it gets);
vLLM's outputs -> ours."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from serve.backends.vllm_params import SAME_NAME_FIELDS, finish_reason, logprobs_position, sampling_kwargs
from serve.types import FinishReason, InvalidRequestError, SamplingParams

vllm = pytest.importorskip("vllm")

EVERY_FIELD = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                             presence_penalty=0.5, frequency_penalty=-0.5, seed=7, max_tokens=9, min_tokens=2,
                             stop=("a", "bc"), stop_token_ids=(3, 4), ignore_eos=True, n=2, logprobs=3,
                             prompt_logprobs=1, skip_special_tokens=False, include_stop_str_in_output=True)


def test_every_field_reaches_vllm_with_its_value():
    ours = EVERY_FIELD
    theirs = vllm.SamplingParams(**sampling_kwargs(ours, speculative_method=None))
    for name in SAME_NAME_FIELDS:
        assert getattr(theirs, name) == getattr(ours, name), name
    assert theirs.top_k == 5 and theirs.stop == ["a", "bc"] and theirs.stop_token_ids == [3, 4]


def test_every_field_of_ours_is_mapped_or_documented():
    """A field added to our SamplingParams must be mapped here (or refused) before the vLLM backend runs it."""
    handled = set(SAME_NAME_FIELDS) | {"top_k", "stop", "stop_token_ids", "speculative", "prompt_logprobs_start"}
    assert {f for f in SamplingParams.__dataclass_fields__} == handled


def test_defaults_mean_the_same():
    theirs = vllm.SamplingParams(**sampling_kwargs(SamplingParams(), speculative_method=None))
    assert theirs.top_k in (0, -1) and theirs.top_p == 1.0 and theirs.temperature == 1.0 and theirs.max_tokens == 16


@pytest.mark.parametrize("speculative,engine,max_tokens,ok", [
    (None, "ngram", 8, True), (None, None, 8, True), (True, "ngram", 8, True), (False, None, 8, True),
    (True, None, 8, False), (False, "draft", 8, False), (False, "ngram", 1, True), (True, None, 1, True)])
def test_per_request_speculation_is_refused_when_vllm_cannot_honour_it(speculative, engine, max_tokens, ok):
    params = SamplingParams(max_tokens=max_tokens, speculative=speculative)
    if ok:
        sampling_kwargs(params, speculative_method=engine)
    else:
        with pytest.raises(InvalidRequestError, match="^speculative: "):
            sampling_kwargs(params, speculative_method=engine)


@pytest.mark.parametrize("reason,stop_reason,ours", [
    (None, None, None), ("stop", None, FinishReason.STOP), ("stop", 7, FinishReason.STOP),
    ("stop", "\n", FinishReason.STOP_STRING), ("length", None, FinishReason.LENGTH),
    ("abort", None, FinishReason.ABORT), ("error", None, FinishReason.ERROR)])
def test_finish_reasons(reason, stop_reason, ours):
    assert finish_reason(reason, stop_reason) is ours


def test_vllm_finish_reason_enum_strings_are_known():
    from vllm.v1.engine import FinishReason as VllmFinishReason

    for reason in (VllmFinishReason.STOP, VllmFinishReason.LENGTH, VllmFinishReason.ABORT, VllmFinishReason.ERROR):
        assert finish_reason(str(reason), None) is not None


def test_logprobs_position_orders_the_top_and_keeps_the_chosen():
    lp = lambda logprob, rank: SimpleNamespace(logprob=logprob, rank=rank, decoded_token=f"t{rank}")  # noqa: E731
    position = {9: lp(-3.0, 4), 1: lp(-0.5, 1), 5: lp(-1.0, 2)}  # chosen 9 is outside the top 2
    out = logprobs_position(9, position, 2)
    assert out.chosen.token_id == 9 and out.chosen.rank == 4 and out.chosen.logprob == -3.0
    assert [t.token_id for t in out.top] == [1, 5]
    assert logprobs_position(1, {1: lp(-0.5, 1)}, 0).top == ()


def test_greedy_n_copies_are_refused_naming_n():
    """vLLM refuses n > 1 with greedy sampling; the backend says so in our terms, before vLLM does."""
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError):
        vllm.SamplingParams(temperature=0.0, n=2)
    with pytest.raises(InvalidRequestError, match="^n: "):
        sampling_kwargs(SamplingParams(temperature=0.0, n=2), speculative_method=None)
    sampling_kwargs(SamplingParams(temperature=0.0, n=1), speculative_method=None)
