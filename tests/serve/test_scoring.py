"""Scoring's pure parts against lm-evaluation-harness's rules (copied here as the reference)."""

from __future__ import annotations

import asyncio

import pytest

from serve.scoring import LoglikelihoodQuery, Scorer, encode_pair, rolling_windows
from serve.types import InvalidRequestError, Logprobs, RequestOutput, TokenLogprob


def lm_eval_rolling_windows(token_list, prefix_token, max_seq_len, context_len=1):
    """lm_eval/utils.py get_rolling_token_windows + make_disjoint_window (0.4), verbatim in substance."""
    pred_len = max_seq_len - context_len + 1
    predicted = 0
    first_seq_len = min(max_seq_len, len(token_list))
    windows = [([prefix_token] + token_list[:first_seq_len - 1], token_list[:first_seq_len])]
    predicted += first_seq_len
    while predicted < len(token_list):
        window_pred_len = min(len(token_list) - predicted, pred_len)
        window_end = predicted + window_pred_len
        windows.append((token_list[window_end - max_seq_len - 1:window_end - 1],
                        token_list[window_end - window_pred_len:window_end]))
        predicted += window_pred_len
    return [(a[:len(a) - (len(b) - 1)], b) for a, b in windows]


@pytest.mark.parametrize("num_tokens", [1, 2, 5, 7, 8, 9, 16, 17, 30])
@pytest.mark.parametrize("max_seq_len", [1, 2, 4, 8])
def test_rolling_windows_match_lm_eval_and_cover_every_token_once(num_tokens, max_seq_len):
    tokens = list(range(100, 100 + num_tokens))
    windows = rolling_windows(tokens, 0, max_seq_len)
    assert windows == lm_eval_rolling_windows(tokens, 0, max_seq_len)
    assert [t for _, continuation in windows for t in continuation] == tokens
    for context, continuation in windows:
        assert context and len(context) + len(continuation) <= max_seq_len + 1
        if context != [0]:  # later windows: the context is exactly what precedes the scored tokens
            start = tokens.index(continuation[0])
            assert context == tokens[start - len(context):start]


def test_encode_pair_moves_trailing_spaces_to_the_continuation():
    encode = lambda text: [ord(c) for c in text.replace(" P", "\x01")]  # " P" is one "token"  # noqa: E731
    assert encode_pair(encode, "capital is ", "Paris") == ([ord(c) for c in "capital is"], [1] + [ord(c) for c in "aris"])
    assert encode_pair(encode, "", "ab") == ([], [97, 98])
    assert encode_pair(encode, (5, 6), "ab") == ([5, 6], [97, 98])
    assert encode_pair(encode, "ab", (7,)) == ([97, 98], [7])


class FakeBackend:
    """Prompt logprobs where token t at any position has logprob -t/100 and rank 1 iff t is even."""

    def __init__(self):
        self.prompts = []

    async def generate(self, request_id, prompt_token_ids, params, *, priority=0):
        assert params.prompt_logprobs == 0 and params.max_tokens == 1
        self.prompts.append(list(prompt_token_ids))
        positions = [None] + [Logprobs(chosen=TokenLogprob(t, -t / 100, 1 if t % 2 == 0 else 2))
                              for t in prompt_token_ids[1:]]
        yield RequestOutput(request_id, (), True, len(prompt_token_ids), prompt_logprobs=tuple(positions))


def _scorer(backend, max_model_len=8, max_prompts=4096):
    return Scorer(backend.generate, lambda text: [ord(c) - 90 for c in text], prefix_token_id=0, vocab_size=100,
                  max_model_len=max_model_len, max_prompts=max_prompts)


def test_scorer_sums_continuation_tokens_and_flags_greedy():
    backend = FakeBackend()
    query = LoglikelihoodQuery(context=(10, 11, 12), continuations=((20, 22), (21,)))
    result = asyncio.run(_scorer(backend).score("r", [query], [(30, 31, 32, 33, 34, 35, 36, 37, 38)]))
    (even, odd), = result.loglikelihood
    assert even.logprob == pytest.approx(-0.42) and even.is_greedy and even.num_tokens == 2
    assert odd.logprob == pytest.approx(-0.21) and not odd.is_greedy
    (rolled,) = result.rolling
    # max_model_len 8: prompts of <= 7 tokens, windows score <= 6: [0] + 30..35, then 32..35 as context + 36..38.
    assert rolled.num_windows == 2 and [t.token_id for t in rolled.tokens] == list(range(30, 39))
    assert rolled.logprob == pytest.approx(-sum(range(30, 39)) / 100)
    assert all(len(p) <= 7 for p in backend.prompts)


def test_scorer_truncates_long_contexts_on_the_left_and_refuses_naming_the_query():
    backend = FakeBackend()
    query = LoglikelihoodQuery(context=tuple(range(10, 20)), continuations=((50, 52),))
    asyncio.run(_scorer(backend).score("r", [query], []))
    assert backend.prompts == [[15, 16, 17, 18, 19, 50, 52]]
    bad = [
        ([LoglikelihoodQuery(context=(1,), continuations=())], [], "loglikelihood[0].continuations"),
        ([LoglikelihoodQuery(context=(1,), continuations=((2,), ()))], [], "loglikelihood[0].continuations[1]"),
        ([LoglikelihoodQuery(context=(1,), continuations=(tuple(range(7)),))], [], "loglikelihood[0].continuations[0]"),
        ([LoglikelihoodQuery(context=(1, 100), continuations=((2,),))], [], "loglikelihood[0].context"),
        ([], ["ok", ""], "rolling[1].text"),
        ([], [], "loglikelihood"),
    ]
    for ll, rolling, field in bad:
        with pytest.raises(InvalidRequestError) as err:
            asyncio.run(_scorer(FakeBackend()).score("r", ll, rolling))
        assert err.value.field == field
    with pytest.raises(InvalidRequestError, match="split it"):
        asyncio.run(_scorer(FakeBackend(), max_prompts=3).score("r", [], [tuple(range(1, 30))]))
