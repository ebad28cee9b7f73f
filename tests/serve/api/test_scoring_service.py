"""Score through the server equals the engine's own prompt logprobs for the same token ids."""

from __future__ import annotations

import pytest

from serve.scoring import encode_pair, rolling_windows
from serve.types import SamplingParams

from .conftest import engine_config

TOLERANCE = 1e-4  # the server batches the queries together; the reference runs them in another batch


@pytest.fixture(scope="module")
def reference(trained_checkpoint):
    from serve.engine.llm_engine import LLMEngine

    return LLMEngine(engine_config(trained_checkpoint))


def _prompt_logprobs(engine, prompts: list[list[int]]) -> list[list[float]]:
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0))
    return [[p.chosen.logprob for p in out.prompt_logprobs[1:]] for out in outs]


def test_loglikelihood_and_rolling_equal_the_engines_prompt_logprobs(client, reference):
    tokenizer = reference.tokenizer
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    context, continuations = "Return the value of ", ["x.", "the key", "os.path"]
    text = "class collections.OrderedDict: a dict that remembers insertion order. " * 20
    response = client.score(loglikelihood=[(context, continuations), ("", ["Return"])], rolling=[text],
                            return_token_logprobs=True)
    pairs = [encode_pair(encode, context, c) for c in continuations]
    expected = _prompt_logprobs(reference, [ctx + cont for ctx, cont in pairs])
    for got, (ctx, cont), want in zip(response.loglikelihood[0].continuations, pairs, expected):
        assert got.num_tokens == len(cont) and [t.token_id for t in got.tokens] == cont
        assert got.logprob == pytest.approx(sum(want[-len(cont):]), abs=TOLERANCE)
        assert got.is_greedy == all(t.rank == 1 for t in got.tokens)
    # An empty context is scored after end-of-text (lm-eval's prefix token).
    (empty,) = response.loglikelihood[1].continuations
    eos = tokenizer.eos_token_id
    assert empty.logprob == pytest.approx(sum(_prompt_logprobs(reference, [[eos, *encode("Return")]])[0]), abs=TOLERANCE)
    # Rolling: longer than the 512-token context, so it takes several windows; every token scored once.
    ids = encode(text)
    windows = rolling_windows(ids, eos, 512 - 2)
    (rolled,) = response.rolling
    assert len(ids) > 512 and rolled.num_windows == len(windows) > 1 and rolled.num_tokens == len(ids)
    want = sum(sum(lps[-len(cont):]) for (ctx, cont), lps
               in zip(windows, _prompt_logprobs(reference, [ctx + cont for ctx, cont in windows])))
    assert rolled.logprob == pytest.approx(want, abs=TOLERANCE * len(windows))


def test_greedy_continuation_is_flagged(client):
    """A continuation the model generates greedily is, by definition, greedy under scoring."""
    reply = client.generate("Return the", temperature=0, max_tokens=4, ignore_eos=True)
    greedy_ids = list(reply.completions[0].token_ids)
    prompt_ids = client.tokenize("Return the")
    response = client.score(loglikelihood=[(prompt_ids, [greedy_ids])])
    assert response.loglikelihood[0].continuations[0].is_greedy
