"""Scorers against brute-force references and lm-evaluation-harness's own functions on the same inputs."""

from __future__ import annotations

import math

import pytest

from serve.evaluation import metrics
from serve.evaluation.task import Extractor


def test_multiple_choice_acc_and_length_normalized():
    # Raw: choice 0 wins; per character: the long choice 1 wins (-6/12 > -2/1).
    assert metrics.multiple_choice([-2.0, -6.0], ["a", "b" * 12], gold=1) == {"acc": 0.0, "acc_norm": 1.0}
    assert metrics.multiple_choice([-1.0, -1.0], ["a", "b"], gold=0) == {"acc": 1.0, "acc_norm": 1.0}  # first on ties
    with pytest.raises(ValueError):
        metrics.multiple_choice([-1.0], ["a", "b"], gold=0)


def test_argmax_matches_numpy():
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(200):
        values = rng.integers(-3, 3, size=int(rng.integers(1, 6))).astype(float).tolist()
        assert metrics.argmax(values) == int(np.argmax(values))


def test_perplexities_against_definitions():
    out = metrics.perplexities(-20.0, num_tokens=10, num_words=4, num_bytes=16)
    assert out["token_perplexity"] == pytest.approx(math.exp(2.0))
    assert out["word_perplexity"] == pytest.approx(math.exp(5.0))
    assert out["byte_perplexity"] == pytest.approx(math.exp(1.25))
    assert out["bits_per_byte"] == pytest.approx(1.25 / math.log(2))


def test_perplexity_aggregations_equal_lm_eval():
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity

    pairs = [(-10.0, 7), (-3.5, 2), (-40.25, 31)]
    ours = metrics.perplexities(sum(p[0] for p in pairs), 1, sum(p[1] for p in pairs), sum(p[1] for p in pairs))
    assert ours["word_perplexity"] == pytest.approx(weighted_perplexity(pairs))
    assert ours["bits_per_byte"] == pytest.approx(bits_per_byte(pairs))


GSM_STRICT = Extractor(r"#### (\-?[0-9\.\,]+)", 0)
GSM_FLEX = Extractor(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1)


@pytest.mark.parametrize("extractor", [GSM_STRICT, GSM_FLEX])
@pytest.mark.parametrize("text", ["so 3 + 4 = 7.\n#### 7", "The answer is $1,200.", "no number", "#### -3 then 12"])
def test_extract_equals_lm_eval_regex_filter(extractor, text):
    from lm_eval.filters.extraction import RegexFilter

    theirs = RegexFilter(regex_pattern=extractor.regex, group_select=extractor.select).apply([[text]], [{}])
    assert metrics.extract(text, extractor) == theirs[0][0]


@pytest.mark.parametrize("prediction, reference", [("1,200", "steps\n#### 1200"), ("$5.", "#### 5"), ("7", "#### 8"),
                                                   ("Paris", "paris")])
def test_exact_match_equals_lm_eval(prediction, reference):
    from lm_eval.api.metrics import exact_match_hf_evaluate

    norm = dict(regexes_to_ignore=[",", "\\$", "(?s).*#### ", "\\.$"], ignore_case=True, ignore_punctuation=False)
    theirs = exact_match_hf_evaluate([prediction], [reference], **norm)["exact_match"]
    assert metrics.exact_match(prediction, [reference], **norm) == theirs
    assert metrics.exact_match("a, b!", ["A B"], ignore_case=True, ignore_punctuation=True) == 1.0


def test_bleu_and_rouge():
    import sacrebleu

    predictions = ["the cat sat on the mat", "a dog barked"]
    references = [["the cat sat on the mat", "a cat sat"], ["the dog barked loudly"]]
    expected = sacrebleu.corpus_bleu(predictions, [["the cat sat on the mat", "the dog barked loudly"],
                                                   ["a cat sat", "the dog barked loudly"]]).score
    assert metrics.corpus_bleu(predictions, references) == pytest.approx(expected)
    assert metrics.corpus_bleu(["the same five words here"], [["the same five words here"]]) == pytest.approx(100.0)
    scores = metrics.rouge("the cat sat", ["a dog", "the cat sat"])  # best over references
    assert scores == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert metrics.rouge("x y", ["a b"])["rouge1"] == 0.0


def test_mean_and_stderr_equal_lm_eval():
    from lm_eval.api.metrics import mean_stderr

    values = [1.0, 0.0, 1.0, 1.0, 0.0]
    mu, se = metrics.mean_and_stderr(values)
    assert mu == pytest.approx(0.6) and se == pytest.approx(mean_stderr(values))
    assert math.isnan(metrics.mean_and_stderr([1.0])[1])
    assert metrics.mean_metrics([{"acc": 1.0}, {"acc": 0.0}]) == {"acc": 0.5, "acc_stderr": pytest.approx(0.5)}
