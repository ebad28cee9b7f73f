"""Stop strings through the engine: `min_tokens` exempts the first tokens' text from them (vLLM v1
semantics), and `include_stop_str_in_output` keeps the matched string, also when it spans two tokens.

The expected outputs are derived from one free-running greedy generation (no stop strings): stopping
never changes the tokens before the stop, and neither does min_tokens without stop ids to mask
(ignore_eos), so the stopped run must be a prefix of the free one, cut where the rule says.
"""

from __future__ import annotations

import pytest

from serve.engine.llm_engine import EngineConfig, LLMEngine
from serve.types import FinishReason, SamplingParams

PROMPT = "os.path.join(a, *p)\n\nJoin two or more pathname components"
# The tiny model's plain greedy output is a run of spaces; a repetition penalty keeps it varied.
FREE = dict(max_tokens=20, temperature=0.0, ignore_eos=True, repetition_penalty=2.0)


@pytest.fixture(scope="module")
def engine(trained_checkpoint) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(trained_checkpoint), block_size=4))


@pytest.fixture(scope="module")
def free(engine):
    """(token ids, text, ends) of the free run; ends[i] = len(text of tokens 0..i)."""
    out = engine.generate([PROMPT], SamplingParams(**FREE))[0].outputs[0]
    ids, text = list(out.token_ids), out.text
    ends = [len(engine.tokenizer.decode(ids[:i + 1])) for i in range(len(ids))]
    assert all(text.startswith(engine.tokenizer.decode(ids[:i + 1])) for i in range(len(ids)))  # ASCII, no merges
    assert len(set(text)) > 5, f"the free run is too repetitive to test stop strings: {text!r}"
    return ids, text, ends


def stream(engine, params: SamplingParams) -> tuple[str, list[int], FinishReason, object]:
    """Run one request step by step; the concatenated deltas, the tokens, and the finish."""
    engine.add_request("r", PROMPT, params)
    text, ids, reason, stop_reason = "", [], None, None
    while engine.has_unfinished_requests():
        for ro in engine.step():
            (c,) = ro.outputs
            text, ids = text + c.text, ids + list(c.token_ids)
            reason, stop_reason = c.finish_reason or reason, c.stop_reason or stop_reason
    assert engine.kv.usage == 0.0
    return text, ids, reason, stop_reason


def token_at(ends: list[int], char_index: int) -> int:
    """The index of the token whose text holds character `char_index`."""
    return next(i for i, end in enumerate(ends) if end > char_index)


def test_min_tokens_exempts_stop_strings_ending_in_the_first_tokens(engine, free):
    ids, text, ends = free
    # a character that occurs in two different tokens' text, the first time not in token 0
    stop = next(c for c in text[ends[0]:] if token_at(ends, text.index(c)) < token_at(ends, text.rindex(c)))
    first = text.index(stop)
    plain = stream(engine, SamplingParams(**FREE, stop=[stop]))
    assert plain[0] == text[:first] and plain[2] is FinishReason.STOP_STRING and plain[3] == stop
    assert plain[1] == ids[:token_at(ends, first) + 1]

    min_tokens = token_at(ends, first) + 1  # the token holding the first occurrence is exempt
    later = text.index(stop, ends[min_tokens - 1])
    got, got_ids, reason, stop_reason = stream(engine, SamplingParams(**FREE, stop=[stop], min_tokens=min_tokens))
    assert got == text[:later] and (reason, stop_reason) == (FinishReason.STOP_STRING, stop)
    assert got_ids == ids[:token_at(ends, later) + 1]


def test_min_tokens_covering_every_occurrence_runs_to_max_tokens(engine, free):
    ids, text, ends = free
    # the text of the first m tokens, for the smallest m > 1 where it occurs nowhere else
    min_tokens = next(m for m in range(2, len(ids)) if text.find(text[:ends[m - 1]], 1) < 0)
    stop = text[:ends[min_tokens - 1]]
    assert stream(engine, SamplingParams(**FREE, stop=[stop]))[0] == ""  # checked, it stops at once
    got, got_ids, reason, _ = stream(engine, SamplingParams(**FREE, stop=[stop], min_tokens=min_tokens))
    assert (got, got_ids, reason) == (text, ids, FinishReason.LENGTH)


@pytest.mark.parametrize("include", [False, True])
def test_include_stop_str_in_output_with_a_stop_spanning_two_tokens(engine, free, include):
    ids, text, ends = free
    # the last character of token i and the first of token i + 1, at their first occurrence
    i = next(i for i in range(1, len(ids) - 1) if ends[i - 1] < ends[i] < ends[i + 1]
             and text.index(text[ends[i] - 1:ends[i] + 1]) == ends[i] - 1)
    stop = text[ends[i] - 1:ends[i] + 1]
    got, got_ids, reason, stop_reason = stream(
        engine, SamplingParams(**FREE, stop=[stop], include_stop_str_in_output=include))
    assert got == (text[:ends[i] + 1] if include else text[:ends[i] - 1])
    assert got_ids == ids[:i + 2]  # the stop is seen at token i + 1, which is still emitted
    assert (reason, stop_reason) == (FinishReason.STOP_STRING, stop)
    whole = engine.generate([PROMPT], SamplingParams(**FREE, stop=[stop], include_stop_str_in_output=include))
    assert whole[0].outputs[0].text == got  # offline, the same text as streamed


def test_stop_token_ids_wait_for_min_tokens_too(engine, free):
    ids, _, _ = free
    stop_id = ids[1]
    params = dict(FREE, ignore_eos=False)
    _, early, reason, _ = stream(engine, SamplingParams(**params, stop_token_ids=[stop_id]))
    assert reason is FinishReason.STOP and early[-1] == stop_id and len(early) <= 2
    _, late, _, _ = stream(engine, SamplingParams(**params, stop_token_ids=[stop_id], min_tokens=5))
    assert len(late) >= 6 and stop_id not in late[:5]
