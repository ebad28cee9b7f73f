"""`serve.worker.sampler` against brute-force float64 references (plain Python loops, V ~ 50) and
statistical checks of the draw (seeded, so deterministic)."""

from __future__ import annotations

import math

import pytest
import torch

from serve.types import SamplingParams
from serve.worker.sampler import (SamplingMetadata, apply_min_p, apply_min_tokens_mask, apply_penalties,
                                  apply_temperature, apply_top_k, apply_top_p, compute_logprobs,
                                  make_generator, sample, sample_batch, sampling_probs, token_counts)

NEG_INF = float("-inf")
VOCAB_SIZE = 50
CHI_SQUARE_DF5_P001 = 20.515  # chi-square critical value, 5 degrees of freedom, p = 0.001


def random_logits(num_rows: int, seed: int, vocab_size: int = VOCAB_SIZE, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(num_rows, vocab_size, generator=torch.Generator().manual_seed(seed)) * scale


# -- float64 references, one row at a time --------------------------------------------------------------


def ref_softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    weights = [math.exp(x - top) if x != NEG_INF else 0.0 for x in logits]
    total = sum(weights)
    return [w / total for w in weights]


def ref_top_k(logits: list[float], k: int) -> list[float]:
    kth = sorted(logits, reverse=True)[min(k, len(logits)) - 1]
    return [x if x >= kth else NEG_INF for x in logits]


def ref_top_p(logits: list[float], top_p: float) -> list[float]:
    probs = ref_softmax(logits)
    cumulative, threshold = 0.0, 0.0
    for p in sorted(probs, reverse=True):
        cumulative += p
        threshold = p
        if cumulative >= top_p:
            break
    return [x if p >= threshold else NEG_INF for x, p in zip(logits, probs)]


def ref_min_p(logits: list[float], min_p: float) -> list[float]:
    probs = ref_softmax(logits)
    return [x if p >= min_p * max(probs) else NEG_INF for x, p in zip(logits, probs)]


def ref_penalties(logits: list[float], prompt: list[int], output: list[int], repetition: float,
                  presence: float, frequency: float) -> list[float]:
    result = []
    for token_id, x in enumerate(logits):
        if token_id in prompt or token_id in output:  # CTRL / transformers' rule
            x = x / repetition if x > 0 else x * repetition
        count = output.count(token_id)  # OpenAI's rule, output tokens only
        x -= frequency * count + presence * (1.0 if count > 0 else 0.0)
        result.append(x)
    return result


def assert_rows_close(actual: torch.Tensor, expected: list[list[float]]) -> None:
    torch.testing.assert_close(actual.double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)


# -- penalties, masks, filters --------------------------------------------------------------------------


def test_penalties_match_reference() -> None:
    logits = random_logits(4, seed=1)
    prompts = [[1, 2, 2, 3], [], [7, 7, 8], [40, 41]]
    outputs = [[3, 4, 4, 4], [5, 5, 9], [], [40, 1, 1]]
    repetition, presence, frequency = [1.3, 1.0, 0.7, 1.0], [0.5, -1.0, 0.0, 0.0], [0.2, 1.5, 2.0, 0.0]
    actual = apply_penalties(logits, prompts, outputs, torch.tensor(repetition), torch.tensor(presence),
                             torch.tensor(frequency))
    expected = [ref_penalties(logits[row].double().tolist(), prompts[row], outputs[row], repetition[row],
                              presence[row], frequency[row]) for row in range(4)]
    assert_rows_close(actual, expected)
    assert torch.equal(actual[3], logits[3])  # neutral parameters leave the row unchanged


def test_token_counts_counts_repeats_per_row() -> None:
    counts = token_counts([[0, 0, 3], [], [2]], vocab_size=4, device=torch.device("cpu"))
    assert counts.tolist() == [[2, 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 0]]


def test_min_tokens_mask_bans_listed_ids_in_listed_rows_only() -> None:
    logits = random_logits(3, seed=2)
    masked = apply_min_tokens_mask(logits, [0, 2], [[0, 5], [49]])
    assert masked[0, 0] == NEG_INF and masked[0, 5] == NEG_INF and masked[2, 49] == NEG_INF
    assert torch.isinf(masked).sum() == 3
    assert torch.equal(masked[1], logits[1])


def test_temperature_divides_sampled_rows_and_leaves_greedy_rows() -> None:
    logits = random_logits(4, seed=3)
    temperature = [0.0, 0.5, 1.0, 2.0]
    actual = apply_temperature(logits, torch.tensor(temperature))
    expected = [[x / (t if t > 0 else 1.0) for x in logits[row].double().tolist()]
                for row, t in enumerate(temperature)]
    assert_rows_close(actual, expected)


def test_top_k_matches_reference_per_row() -> None:
    logits = random_logits(4, seed=4)
    logits[3, :10] = 5.0  # ten tied maxima: k = 3 keeps all ten
    top_k = [1, 7, VOCAB_SIZE, 3]
    actual = apply_top_k(logits, torch.tensor(top_k))
    expected = [ref_top_k(logits[row].double().tolist(), k) for row, k in enumerate(top_k)]
    assert_rows_close(actual, expected)
    assert (actual[3] > NEG_INF).sum() == 10
    torch.testing.assert_close(apply_top_k(logits, torch.tensor(top_k), max_top_k=7), actual)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.7, 0.9, 0.99, 1.0])
def test_top_p_matches_reference(top_p: float) -> None:
    logits = random_logits(6, seed=5)
    actual = apply_top_p(logits, torch.full((6,), top_p))
    expected = [ref_top_p(logits[row].double().tolist(), top_p) for row in range(6)]
    assert_rows_close(actual, expected)
    assert ((actual > NEG_INF).sum(dim=-1) >= 1).all()  # the most likely token always survives


def test_top_p_keeps_every_token_tied_at_the_boundary() -> None:
    # probabilities 0.4, 0.2, 0.2, 0.2: mass 0.5 is reached at a 0.2 token, and all three 0.2s tie
    logits = torch.tensor([[0.0, math.log(0.5), math.log(0.5), math.log(0.5)]]).log_softmax(-1) + 1.0
    kept = apply_top_p(logits, torch.tensor([0.5])) > NEG_INF
    assert kept.tolist() == [[True, True, True, True]]
    kept = apply_top_p(logits, torch.tensor([0.3])) > NEG_INF
    assert kept.tolist() == [[True, False, False, False]]
    # top_p = 1 keeps even tokens whose probability a float32 cumsum cannot see
    tiny = torch.tensor([[0.0, 0.0, -40.0, -60.0]])
    assert (apply_top_p(tiny, torch.tensor([1.0])) > NEG_INF).all()


@pytest.mark.parametrize("min_p", [0.0, 0.01, 0.1, 0.5])
def test_min_p_matches_reference(min_p: float) -> None:
    logits = random_logits(5, seed=6)
    actual = apply_min_p(logits, torch.full((5,), min_p))
    expected = [ref_min_p(logits[row].double().tolist(), min_p) for row in range(5)]
    assert_rows_close(actual, expected)


# -- drawing --------------------------------------------------------------------------------------------


def chi_square(token_ids: torch.Tensor, probs: list[float]) -> tuple[float, float]:
    """(chi-square statistic over the tokens with p > 0, total variation distance)."""
    counts = torch.bincount(token_ids, minlength=len(probs)).double()
    num_draws = float(token_ids.numel())
    statistic = sum((counts[v].item() - num_draws * p) ** 2 / (num_draws * p) for v, p in enumerate(probs) if p > 0)
    total_variation = 0.5 * sum(abs(counts[v].item() / num_draws - p) for v, p in enumerate(probs))
    return statistic, total_variation


def test_sample_matches_a_fixed_distribution() -> None:
    probs = [0.05, 0.1, 0.15, 0.2, 0.22, 0.28]
    num_draws = 20_000
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        token_ids = sample(torch.tensor([probs]).expand(num_draws, -1).contiguous(), [None] * num_draws)
    statistic, total_variation = chi_square(token_ids, probs)
    assert statistic < CHI_SQUARE_DF5_P001
    assert total_variation < 0.015


def test_sample_never_draws_a_zero_probability_token() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).expand(5000, -1).contiguous()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        token_ids = sample(probs, [None] * 5000)
    assert set(token_ids.tolist()) == {1, 3}


def test_sample_batch_draws_from_the_filtered_distribution() -> None:
    """temperature -> top-k -> top-p -> min-p composed, against the float64 reference distribution."""
    logits = torch.tensor([2.0, 1.6, 1.3, 1.0, 0.4, 0.0, -0.5, -1.0, -2.0, -3.0])
    params = SamplingParams(temperature=0.8, top_k=9, top_p=0.985, min_p=0.06)
    scaled = [x / 0.8 for x in logits.double().tolist()]
    after_top_k = ref_top_k(scaled, 9)
    after_top_p = ref_top_p(after_top_k, 0.985)
    probs = ref_softmax(ref_min_p(after_top_p, 0.06))
    # each filter matters in this example: 10 tokens -> 9 -> 7 -> 6
    assert [sum(x > NEG_INF for x in row) for row in (after_top_k, after_top_p)] == [9, 7]
    assert sum(p > 0 for p in probs) == 6
    num_draws = 20_000
    meta = SamplingMetadata.from_params([params] * num_draws, vocab_size=10, device="cpu",
                                        prompt_token_ids=[[0]] * num_draws, output_token_ids=[[]] * num_draws)
    with torch.random.fork_rng():
        torch.manual_seed(99)
        token_ids = sample_batch(logits.expand(num_draws, -1), meta).token_ids
    assert set(token_ids.tolist()) <= {v for v, p in enumerate(probs) if p > 0}
    statistic, total_variation = chi_square(token_ids, probs)
    assert statistic < CHI_SQUARE_DF5_P001 and total_variation < 0.015
    torch.testing.assert_close(sampling_probs(logits[None], meta_for([params], 10))[0].double(),
                               torch.tensor(probs, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def meta_for(params: list[SamplingParams], vocab_size: int = VOCAB_SIZE, outputs: list[list[int]] | None = None,
             **kwargs) -> SamplingMetadata:
    outputs = outputs if outputs is not None else [[] for _ in params]
    return SamplingMetadata.from_params(params, vocab_size=vocab_size, device="cpu",
                                        prompt_token_ids=[[1, 2]] * len(params), output_token_ids=outputs, **kwargs)


def test_seeded_request_gets_the_same_tokens_whatever_the_batch() -> None:
    seeded = SamplingParams(temperature=1.0, top_k=20, seed=42)
    own_logits = random_logits(1, seed=7)
    other = SamplingParams(temperature=1.3)
    batches = [  # (row of the seeded request, batch size)
        (0, 1), (0, 3), (2, 3), (5, 8),
    ]
    runs = []
    for row, batch_size in batches:
        generator = make_generator(42, "cpu")
        tokens = []
        for step in range(6):
            logits = random_logits(batch_size, seed=100 + step + batch_size)
            logits[row] = own_logits[0] + step  # the seeded request's logits do not depend on the batch
            params = [other] * batch_size
            params[row] = seeded
            generators = [None] * batch_size
            generators[row] = generator
            tokens.append(sample_batch(logits, meta_for(params, generators=generators)).token_ids[row].item())
        runs.append(tokens)
    assert all(tokens == runs[0] for tokens in runs), runs
    assert len(set(runs[0])) > 1  # it really sampled


def test_seed_without_generator_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="generator"):
        meta_for([SamplingParams(seed=3)])


def test_greedy_is_argmax_of_the_penalized_logits_with_ties_to_the_lowest_id() -> None:
    logits = random_logits(3, seed=8)
    logits[1, 4] = logits[1, 9] = logits[1].max() + 1.0  # tie: lowest id wins
    greedy = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0), SamplingParams(temperature=1e-7)]
    assert sample_batch(logits, meta_for(greedy)).token_ids.tolist() == [logits[0].argmax().item(), 4,
                                                                          logits[2].argmax().item()]
    # a repetition penalty on the top token moves greedy's choice, as in transformers
    top_id = logits[0].argmax().item()
    penalized = SamplingParams(temperature=0.0, repetition_penalty=1e3)
    choice = sample_batch(logits[:1], meta_for([penalized], outputs=[[top_id]])).token_ids.item()
    expected = ref_penalties(logits[0].double().tolist(), [1, 2], [top_id], 1e3, 0.0, 0.0)
    assert choice == max(range(VOCAB_SIZE), key=expected.__getitem__) != top_id


def test_mixed_batch_greedy_rows_are_argmax() -> None:
    logits = random_logits(4, seed=9)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_p=0.5),
              SamplingParams(temperature=0.0), SamplingParams(temperature=2.0, min_p=0.1)]
    meta = meta_for(params)
    assert not meta.all_greedy and not meta.all_random and meta.top_k is None
    assert meta.top_p.tolist() == [1.0, 0.5, 1.0, 1.0] and not meta.needs_penalties
    token_ids = sample_batch(logits, meta).token_ids
    assert token_ids[0] == logits[0].argmax() and token_ids[2] == logits[2].argmax()


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    logits = torch.zeros(3, VOCAB_SIZE)
    logits[:, 0] = 10.0  # EOS
    logits[:, 7] = 9.0   # a stop token id
    logits[:, 30] = 8.0
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[7])
    ignoring_eos = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[7], ignore_eos=True)
    meta = meta_for([params, params, ignoring_eos], outputs=[[5], [5, 6], [5]], eos_token_ids=[0])
    assert meta.min_tokens_row_ids == (0, 2)
    assert meta.min_tokens_banned_token_ids == ((7, 0), (7,))
    # row 0: 1 < 2 generated -> EOS and 7 banned; row 1: reached -> EOS; row 2: EOS allowed, 7 banned
    assert sample_batch(logits, meta).token_ids.tolist() == [30, 0, 0]


# -- logprobs -------------------------------------------------------------------------------------------


def test_compute_logprobs_matches_log_softmax_topk_and_brute_force_rank() -> None:
    logits = random_logits(4, seed=10)
    logits[3, 11] = logits[3, 12] = logits[3].max() + 0.5  # tied best: both rank 1
    token_ids = torch.tensor([3, int(logits[1].argmax()), int(logits[2].argmin()), 12])
    result = compute_logprobs(logits, token_ids, num_top=5)
    reference = logits.double().log_softmax(-1)
    torch.testing.assert_close(result.chosen_logprobs.double(), reference.gather(1, token_ids[:, None])[:, 0])
    expected_top = logits.float().log_softmax(-1).topk(5)
    assert torch.equal(result.top_token_ids, expected_top.indices)
    torch.testing.assert_close(result.top_logprobs, expected_top.values)
    ranks = [1 + sum(reference[row, v] > reference[row, token_ids[row]] for v in range(VOCAB_SIZE))
             for row in range(4)]
    assert result.chosen_ranks.tolist() == ranks and ranks[1] == 1 and ranks[2] == VOCAB_SIZE and ranks[3] == 1
    assert compute_logprobs(logits, token_ids, num_top=0).top_token_ids.shape == (4, 0)

    as_types = result.to_logprobs(token_ids, [2, 0, 5, 2])
    assert [len(entry.top) for entry in as_types] == [2, 0, 5, 2]
    assert as_types[3].chosen.rank == 1 and [t.rank for t in as_types[3].top] == [1, 1]
    assert as_types[0].chosen.token_id == 3 and as_types[0].top[1].rank == 2


def test_sample_batch_logprobs_are_of_the_raw_logits() -> None:
    logits = random_logits(2, seed=11).to(torch.bfloat16)  # half-precision logits are upcast
    params = [SamplingParams(temperature=0.5, top_k=3, repetition_penalty=2.0, logprobs=4),
              SamplingParams(temperature=0.0, logprobs=1)]
    output = sample_batch(logits, meta_for(params, outputs=[[1, 2, 3], []], generators=None))
    raw = logits.float().log_softmax(-1)
    assert output.logprobs.top_logprobs.shape == (2, 4)
    torch.testing.assert_close(output.logprobs.chosen_logprobs, raw.gather(1, output.token_ids[:, None])[:, 0])
    assert output.token_ids.dtype == torch.int64


def test_metadata_flags_skip_unneeded_stages() -> None:
    greedy = meta_for([SamplingParams(temperature=0.0, top_k=5, top_p=0.5)] * 2)
    assert greedy.all_greedy and greedy.top_k is None and greedy.top_p is None and greedy.min_p is None
    assert greedy.max_num_logprobs is None and not greedy.needs_penalties
    mixed = meta_for([SamplingParams(top_k=5, logprobs=3), SamplingParams(top_k=VOCAB_SIZE + 10, logprobs=7),
                      SamplingParams(frequency_penalty=0.5)])
    assert mixed.all_random and mixed.max_top_k == 5 and mixed.max_num_logprobs == 7
    assert mixed.top_k.tolist() == [5, VOCAB_SIZE, VOCAB_SIZE]
    assert mixed.needs_penalties and mixed.prompt_token_ids == [(), (), [1, 2]]
