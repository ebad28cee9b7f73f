"""`serve.spec_decode.rejection`: greedy identity, statistical losslessness, acceptance rate, seeding.

Statistical tests use a fixed seed, so each is deterministic; the threshold says how unlucky a correct
sampler would have to be (p-value < 1e-3) and `assert_has_power` shows a known-wrong sampler would
land far beyond it at the same sample size. Chi-square survival: sf(x; df) = Q(df/2, x/2), the
regularised upper incomplete gamma (torch.special.gammaincc), since scipy is not a dependency.
"""

from __future__ import annotations

import pytest
import torch

from serve.spec_decode.rejection import (expected_acceptance_rate, expected_num_emitted,
                                         rejection_sample)

P_VALUE_THRESHOLD = 1e-3
NUM_TRIALS = 40_000
P = torch.tensor([0.30, 0.05, 0.20, 0.10, 0.25, 0.10], dtype=torch.float64)  # target, V = 6
Q = torch.tensor([0.10, 0.30, 0.15, 0.25, 0.05, 0.15], dtype=torch.float64)  # draft; alpha = 0.55


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """(statistic, p-value) of Pearson's test of `counts` against `probs` (all cells, df = cells - 1)."""
    counts, probs = counts.double().flatten(), probs.double().flatten()  # (cells,)
    expected = counts.sum() * probs  # (cells,)
    assert expected.min() >= 5, "too few expected counts per cell for the chi-square approximation"
    statistic = ((counts - expected) ** 2 / expected).sum()
    df = torch.tensor((counts.numel() - 1) / 2, dtype=torch.float64)
    return float(statistic), float(torch.special.gammaincc(df, statistic / 2))


def assert_distribution(counts: torch.Tensor, probs: torch.Tensor) -> None:
    statistic, p_value = chi_square(counts, probs)
    tv = 0.5 * float((counts.double().flatten() / counts.sum() - probs.flatten()).abs().sum())
    print(f"chi2={statistic:.2f} df={counts.numel() - 1} p={p_value:.3f} tv={tv:.4f} n={int(counts.sum())}")
    assert p_value > P_VALUE_THRESHOLD, f"chi2={statistic:.2f}, p-value {p_value:.2e}, tv={tv:.4f}"


def assert_has_power(wrong: torch.Tensor, probs: torch.Tensor, num_samples: int) -> None:
    """A sampler emitting `wrong` would score chi2 ~ df + lambda: lambda must dwarf the critical value."""
    noncentrality = num_samples * float(((wrong - probs) ** 2 / probs).sum())
    print(f"power: a wrong sampler's noncentrality lambda = {noncentrality:.0f}")
    assert noncentrality > 200  # chi2 critical value at p = 1e-3 is 20.5 (df 5) and 51.2 (df 24)


def test_chi_square_helper_matches_tables() -> None:
    # chi2.sf(3.8415, 1) = chi2.sf(11.0705, 5) = 0.05 (standard tables)
    assert torch.special.gammaincc(torch.tensor(0.5, dtype=torch.float64), torch.tensor(3.8415 / 2)) == \
        pytest.approx(0.05, abs=1e-4)
    assert chi_square(torch.tensor([50.0, 50.0]), torch.tensor([0.5, 0.5]))[1] == pytest.approx(1.0)


# --- greedy ----------------------------------------------------------------------------------------

def greedy_reference(p: torch.Tensor, drafts: list[int]) -> list[int]:
    """Non-speculative greedy reading of the same probabilities: accept while draft == argmax."""
    emitted = []
    for slot, draft in enumerate(drafts):
        best = int(p[slot].argmax())
        emitted.append(best)
        if draft != best:
            return emitted
    return emitted + [int(p[len(drafts)].argmax())]


def test_greedy_matches_argmax_for_random_rows_with_mixed_k() -> None:
    g = torch.Generator().manual_seed(0)
    B, K, V = 64, 5, 11
    p = torch.softmax(3 * torch.randn(B, K + 1, V, generator=g), -1)  # (B, K+1, V)
    argmax = p.argmax(-1)[:, :K]  # (B, K)
    is_wrong = torch.rand(B, K, generator=g) < 0.25  # (B, K) drafts mostly right, some wrong
    drafts = torch.where(is_wrong, torch.randint(0, V, (B, K), generator=g), argmax)  # (B, K)
    drafts[0], drafts[1, 0] = argmax[0], (argmax[1, 0] + 1) % V  # row 0 all accepted, row 1 rejects first
    num_drafts = torch.randint(0, K + 1, (B,), generator=g)  # (B,)
    num_drafts[0], num_drafts[1], num_drafts[2] = K, K, 0
    seeded = torch.Generator().manual_seed(1)
    state = seeded.get_state()
    out = rejection_sample(p, drafts, None, num_drafts, torch.ones(B, dtype=torch.bool), [seeded] * B)
    expected = [greedy_reference(p[b], drafts[b, :num_drafts[b]].tolist()) for b in range(B)]
    assert out.to_lists() == expected
    assert out.to_lists()[0] == argmax[0].tolist() + [int(p[0, K].argmax())]  # bonus token
    assert out.num_accepted[1] == 0 and out.num_accepted[0] == K
    assert (out.num_emitted == out.num_accepted + 1).all()
    assert torch.equal(seeded.get_state(), state)  # greedy rows draw nothing
    # draft_probs are ignored for greedy rows
    q = torch.softmax(torch.randn(B, K, V, generator=g), -1)  # (B, K, V)
    again = rejection_sample(p, drafts, q, num_drafts, torch.ones(B, dtype=torch.bool), [None] * B)
    assert again.to_lists() == expected


def test_greedy_rows_follow_the_callers_argmax_when_given() -> None:
    # The sampler takes greedy ids from processed logits; where softmax rounding ties two logits, the
    # caller's ids are the truth. Here they deliberately disagree with argmax(p) to show which is used.
    p = torch.softmax(torch.tensor([[[0.0, 5.0, 0.0], [5.0, 0.0, 0.0]]]), -1)  # (1, 2, V) argmax 1, then 0
    caller_ids = torch.tensor([[2, 1]])  # (1, K+1)
    out = rejection_sample(p, torch.tensor([[2]]), None, torch.tensor([1]), torch.tensor([True]), [None],
                           target_argmax_ids=caller_ids)
    assert out.to_lists() == [[2, 1]]
    with pytest.raises(ValueError, match="target_argmax_ids"):
        rejection_sample(p, torch.tensor([[2]]), None, torch.tensor([1]), torch.tensor([True]), [None],
                         target_argmax_ids=caller_ids[:, :1])


def second_order_model(num_vocab: int, seed: int) -> torch.Tensor:
    """A toy target: next-token probabilities as a table over the last two tokens, (V, V, V)."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(num_vocab, num_vocab, num_vocab, generator=g, dtype=torch.float64), -1)


def test_greedy_speculative_generation_equals_plain_greedy_generation() -> None:
    V, K, num_new = 8, 4, 60
    table = second_order_model(V, seed=3)  # (V, V, V)
    plain = [1, 2]
    while len(plain) < 2 + num_new:
        plain.append(int(table[plain[-2], plain[-1]].argmax()))
    g = torch.Generator().manual_seed(4)
    tokens, num_steps = [1, 2], 0
    while len(tokens) < 2 + num_new:
        # drafts: the true greedy continuation, corrupted at random positions
        truth = plain[len(tokens):len(tokens) + K] + [0] * K
        drafts = [t if torch.rand(1, generator=g) < 0.7 else int(torch.randint(0, V, (1,), generator=g))
                  for t in truth[:K]]
        context = tokens + drafts
        p = torch.stack([table[context[i - 2], context[i - 1]] for i in range(len(tokens), len(tokens) + K + 1)])
        out = rejection_sample(p[None], torch.tensor([drafts]), None, torch.tensor([K]),
                               torch.tensor([True]), [None])  # p[None]: (1, K+1, V)
        tokens += out.to_lists()[0]
        num_steps += 1
    assert tokens[:2 + num_new] == plain
    assert num_steps < num_new  # speculation did save steps


# --- statistical losslessness ----------------------------------------------------------------------

def test_one_draft_from_q_emits_p_and_accepts_at_closed_form_rate() -> None:
    g = torch.Generator().manual_seed(10)
    N, V = NUM_TRIALS, P.numel()
    drafts = torch.multinomial(Q.expand(N, V), 1, replacement=True, generator=g)  # (N, 1) x ~ q
    target = P.expand(N, 2, V)  # (N, K+1=2, V)
    draft_probs = Q.expand(N, 1, V)  # (N, 1, V)
    generators = [g if b % 2 else None for b in range(N)]  # both RNG paths
    with torch.random.fork_rng():
        torch.manual_seed(11)
        out = rejection_sample(target, drafts, draft_probs, torch.ones(N, dtype=torch.long),
                               torch.zeros(N, dtype=torch.bool), generators)
    assert_distribution(torch.bincount(out.token_ids[:, 0], minlength=V), P)
    alpha = float(expected_acceptance_rate(P, Q))
    rate = out.num_accepted.double().mean().item()
    sigma = (alpha * (1 - alpha) / N) ** 0.5
    print(f"acceptance {rate:.4f} vs closed form {alpha:.4f} (sigma {sigma:.4f})")
    assert alpha == pytest.approx(0.55)
    assert abs(rate - alpha) < 4 * sigma
    # Resampling from p (not the residual) after a rejection would emit min(p, q) + (1 - alpha) p.
    assert_has_power(torch.minimum(P, Q) + (1 - alpha) * P, P, N)


@pytest.mark.parametrize("draft_choice", ["likely", "unlikely", "random"])
def test_point_mass_draft_emits_p_and_accepts_with_probability_p_of_draft(draft_choice: str) -> None:
    g = torch.Generator().manual_seed(20)
    N, V = NUM_TRIALS, P.numel()
    drafts = {"likely": torch.zeros(N, 1, dtype=torch.long),  # p = 0.30
              "unlikely": torch.ones(N, 1, dtype=torch.long),  # p = 0.05
              "random": torch.randint(0, V, (N, 1), generator=g)}[draft_choice]  # (N, 1)
    out = rejection_sample(P.expand(N, 2, V), drafts, None, torch.ones(N, dtype=torch.long),
                           torch.zeros(N, dtype=torch.bool), [g] * N)
    assert_distribution(torch.bincount(out.token_ids[:, 0], minlength=V), P)
    expected_rate = P[drafts[:, 0]].mean().item()  # accept with probability p(x)
    rate = out.num_accepted.double().mean().item()
    assert abs(rate - expected_rate) < 4 * (expected_rate * (1 - expected_rate) / N) ** 0.5
    # Emitting the draft when accepted and a p-sample otherwise would give p(x) onehot + (1 - p(x)) p.
    if draft_choice != "random":
        x = int(drafts[0, 0])
        assert_has_power(P[x] * torch.nn.functional.one_hot(torch.tensor(x), V) + (1 - P[x]) * P, P, N)


def markov_chain(num_vocab: int, seed: int) -> torch.Tensor:
    """Next-token probabilities given the previous token, (V, V), bounded away from 0."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(num_vocab, num_vocab, generator=g, dtype=torch.float64), -1)


@pytest.mark.parametrize("draft_kind", ["model", "point_mass"])
def test_first_two_emitted_tokens_have_the_targets_joint_distribution(draft_kind: str) -> None:
    """Context-dependent p and q, up to 3 drafts per row (ragged): P(t1, t2) = T[c, t1] T[t1, t2]."""
    N, V, K, start = NUM_TRIALS, 5, 3, 0
    target, draft = markov_chain(V, seed=30), markov_chain(V, seed=31)  # (V, V) each
    g = torch.Generator().manual_seed(32)
    num_drafts = torch.randint(0, K + 1, (N,), generator=g)  # (N,)
    emitted: list[list[int]] = [[] for _ in range(N)]
    pending = torch.arange(N)  # rows still short of two tokens
    last = torch.full((N,), start)  # (N,) previous token of each row
    with torch.random.fork_rng():
        torch.manual_seed(33)
        while pending.numel():
            rows = pending.numel()
            context = [last[pending]]  # K+1 tensors of (rows,)
            for _ in range(K):
                if draft_kind == "model":
                    context.append(torch.multinomial(draft[context[-1]], 1, generator=g)[:, 0])  # x ~ q(.|prev)
                else:
                    context.append((context[-1] * 2 + 1) % V)  # a deterministic guess: q is a point mass
            context = torch.stack(context, 1)  # (rows, K+1)
            p = target[context]  # (rows, K+1, V) p_i conditioned on the drafts before it
            q = draft[context[:, :K]] if draft_kind == "model" else None  # (rows, K, V)
            generators = [g if b % 3 else None for b in range(rows)]
            out = rejection_sample(p, context[:, 1:], q, num_drafts[pending], torch.zeros(rows, dtype=torch.bool),
                                   generators)
            for row, new_tokens in zip(pending.tolist(), out.to_lists(), strict=True):
                emitted[row] += new_tokens
            last[pending] = out.token_ids[torch.arange(rows), out.num_emitted - 1]
            pending = torch.tensor([row for row in pending.tolist() if len(emitted[row]) < 2], dtype=torch.long)
    pairs = torch.tensor([row[:2] for row in emitted])  # (N, 2)
    counts = torch.bincount(pairs[:, 0] * V + pairs[:, 1], minlength=V * V).reshape(V, V)  # (V, V)
    joint = target[start][:, None] * target  # (V, V) P(t1, t2)
    assert_distribution(counts, joint)
    assert_has_power(target[start][:, None] * draft, joint, N)  # second token from q instead of p


def test_mean_tokens_per_step_matches_equation_1() -> None:
    g = torch.Generator().manual_seed(40)
    N, K, V = NUM_TRIALS, 3, P.numel()
    drafts = torch.multinomial(Q.expand(N * K, V), 1, replacement=True, generator=g).reshape(N, K)  # (N, K)
    out = rejection_sample(P.expand(N, K + 1, V), drafts, Q.expand(N, K, V), torch.full((N,), K),
                           torch.zeros(N, dtype=torch.bool), [g] * N)
    alpha = float(expected_acceptance_rate(P, Q))
    mean, std = out.num_emitted.double().mean().item(), out.num_emitted.double().std().item()
    print(f"tokens per step {mean:.4f} vs (1 - a^(k+1)) / (1 - a) = {expected_num_emitted(alpha, K):.4f}")
    assert abs(mean - expected_num_emitted(alpha, K)) < 4 * std / N ** 0.5
    assert expected_num_emitted(1.0, K) == K + 1


# --- seeding, edges, errors ------------------------------------------------------------------------

def random_batch(seed: int, B: int = 6, K: int = 4, V: int = 9) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(B, K + 1, V, generator=g), -1)  # (B, K+1, V)
    q = torch.softmax(torch.randn(B, K, V, generator=g), -1)  # (B, K, V)
    drafts = torch.multinomial(q.reshape(B * K, V), 1, generator=g).reshape(B, K)  # (B, K)
    return p, q, drafts


def test_seeded_rows_are_reproducible_and_independent_of_the_batch() -> None:
    p, q, drafts = random_batch(50)
    B, K = drafts.shape
    num_drafts = torch.tensor([4, 2, 0, 3, 4, 1])
    not_greedy = torch.zeros(B, dtype=torch.bool)

    def run(seed: int) -> list[list[int]]:
        gens = [torch.Generator().manual_seed(seed + b) for b in range(B)]
        return rejection_sample(p, drafts, q, num_drafts, not_greedy, gens).to_lists()

    rng_state = torch.get_rng_state()
    assert run(0) == run(0)
    assert torch.equal(torch.get_rng_state(), rng_state)  # seeded rows leave the default RNG alone
    assert run(0) != run(100)
    # Row 1 alone, padded to a different width: the same draws, the same tokens.
    alone = rejection_sample(p[1:2, :3], drafts[1:2, :2], q[1:2, :2], num_drafts[1:2], not_greedy[1:2],
                             [torch.Generator().manual_seed(1)])
    assert alone.to_lists()[0] == run(0)[1]


def test_certain_and_impossible_drafts() -> None:
    V = 4
    p = torch.nn.functional.one_hot(torch.tensor([[2, 3]]), V).double()  # (1, 2, V) p puts all mass on 2
    keep = rejection_sample(p, torch.tensor([[2]]), None, torch.tensor([1]), torch.tensor([False]), [None])
    assert keep.to_lists() == [[2, 3]]  # accepted with probability p(2) = 1, then the bonus token
    q = torch.full((1, 1, V), 0.25, dtype=torch.float64)  # (1, 1, V)
    for generator_seed in range(20):
        gen = torch.Generator().manual_seed(generator_seed)
        out = rejection_sample(p, torch.tensor([[1]]), q, torch.tensor([1]), torch.tensor([False]), [gen])
        assert out.to_lists() == [[2]]  # p(1) = 0: always rejected, residual (p - q)+ is all on 2


def test_no_drafts_samples_from_p_and_half_precision_is_accepted() -> None:
    p = torch.tensor([[[0.0, 1.0, 0.0]]], dtype=torch.float16)  # (1, K+1=1, V)
    out = rejection_sample(p, torch.zeros(1, 0, dtype=torch.long), None, torch.tensor([0]),
                           torch.tensor([False]), [None])
    assert out.to_lists() == [[1]] and out.token_ids.shape == (1, 1)


def test_bad_shapes_name_the_argument() -> None:
    p, q, drafts = random_batch(60)
    B, K = drafts.shape
    ok = dict(target_probs=p, draft_token_ids=drafts, draft_probs=q, num_draft_tokens=torch.full((B,), K),
              is_greedy=torch.zeros(B, dtype=torch.bool), generators=[None] * B)
    for name, bad in [("draft_token_ids", drafts[:, :2]), ("draft_probs", q[:, :, :3]),
                      ("num_draft_tokens", torch.full((B,), K + 1)), ("generators", [None])]:
        with pytest.raises(ValueError, match=name):
            rejection_sample(**{**ok, name: bad})
