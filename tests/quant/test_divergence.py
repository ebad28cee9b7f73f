"""KL(parent || quantized) and top-1 agreement (quant/divergence.py): the math against a brute-force float64
reference, a model against itself (KL 0, agreement 1), and the on-disk parent cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from quant.divergence import ParentLogProbs, evaluate_set, summarize, token_kl, top1_agreement


def _brute_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> list[float]:
    """Σ_v p_v log(p_v / q_v) per row, from softmax computed by hand in Python floats."""
    out = []
    for pr, qr in zip(p_logits.tolist(), q_logits.tolist()):
        zp = sum(math.exp(x) for x in pr)
        zq = sum(math.exp(x) for x in qr)
        total = 0.0
        for a, b in zip(pr, qr):
            p, q = math.exp(a) / zp, math.exp(b) / zq
            if p > 0:
                total += p * math.log(p / q)
        out.append(total)
    return out


def test_token_kl_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    p_logits = torch.randn(6, 50, generator=g, dtype=torch.float64) * 3
    q_logits = p_logits + 0.3 * torch.randn(6, 50, generator=g, dtype=torch.float64)
    kl = token_kl(torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1))
    assert kl.shape == (6,)
    assert kl.tolist() == pytest.approx(_brute_kl(p_logits, q_logits), rel=1e-9, abs=1e-12)
    assert (kl > 0).all()
    # Not symmetric: KL(P||Q) is what is asked for, not KL(Q||P).
    reverse = token_kl(torch.log_softmax(q_logits, -1), torch.log_softmax(p_logits, -1))
    assert not torch.allclose(kl, reverse)


def test_token_kl_float32_inputs_and_zero_probability_tokens():
    p = torch.log_softmax(torch.tensor([[2.0, 0.0, -math.inf, 1.0]]), -1)  # the parent rules token 2 out
    q = torch.log_softmax(torch.tensor([[1.5, 0.5, 3.0, 1.0]]), -1)
    kl = token_kl(p, q)
    assert math.isfinite(float(kl)) and float(kl) == pytest.approx(_brute_kl(p.double().exp().log(), q.double())[0],
                                                                   rel=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        token_kl(p, q[:, :3])


def test_identical_distributions_give_zero_kl_and_full_agreement():
    logp = torch.log_softmax(torch.randn(10, 32000), -1)
    assert torch.equal(token_kl(logp, logp.clone()), torch.zeros(10, dtype=torch.float64))
    assert top1_agreement(logp, logp.clone()).all()


def test_top1_agreement_and_summary():
    p = torch.log_softmax(torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 5.0]]), -1)
    q = torch.log_softmax(torch.tensor([[3.0, 1.0, 0.0], [0.0, 1.0, 2.0], [1.0, 0.0, 4.0]]), -1)
    agree = top1_agreement(p, q)
    assert agree.tolist() == [True, False, True]
    kl = np.array([0.0] * 98 + [1.0, 5.0])
    s = summarize(kl, np.array([True] * 75 + [False] * 25))
    assert s["kl_mean"] == pytest.approx(0.06) and s["top1_agreement"] == 0.75 and s["positions"] == 100
    assert s["kl_p99"] == pytest.approx(np.percentile(kl, 99)) and 1.0 <= s["kl_p99"] <= 5.0
    with pytest.raises(ValueError):
        summarize(np.zeros(3), np.ones(2, dtype=bool))


class _Table(torch.nn.Module):
    """A 'language model' whose logits are a fixed table row per input token (enough to drive evaluate_set)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, ids):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.table[ids])


def test_evaluate_set_model_against_itself_and_a_perturbed_copy(tmp_path):
    g = torch.Generator().manual_seed(1)
    vocab = 40
    table = torch.randn(vocab, vocab, generator=g) * 2
    blocks = torch.randint(0, vocab, (3, 17), generator=g)
    with ParentLogProbs({"own": blocks}, vocab, tmp_path) as cache:
        assert cache.nbytes == 3 * 16 * vocab * 4
        parent = evaluate_set(_Table(table), blocks, "own", cache, parent=True, progress=False)
        same = evaluate_set(_Table(table.clone()), blocks, "own", cache, parent=False, progress=False)
        assert same["kl_mean"] == 0.0 and same["kl_p99"] == 0.0 and same["top1_agreement"] == 1.0
        assert same["positions"] == 3 * 16 and same["perplexity"] == pytest.approx(parent["perplexity"], rel=1e-12)
        noisy = table + 0.5 * torch.randn(vocab, vocab, generator=g)
        other = evaluate_set(_Table(noisy), blocks, "own", cache, parent=False, progress=False)
        ref = [kl for row in blocks for kl in _brute_kl(table[row[:-1]].double(), noisy[row[:-1]].double())]
        assert other["kl_mean"] == pytest.approx(np.mean(ref), rel=1e-5)
        assert other["kl_p99"] == pytest.approx(np.percentile(ref, 99), rel=1e-5)
        argmax_same = [int(table[t].argmax() == noisy[t].argmax()) for row in blocks for t in row[:-1]]
        assert other["top1_agreement"] == pytest.approx(np.mean(argmax_same))
        nll = -np.mean([float(torch.log_softmax(noisy[a], -1)[b]) for row in blocks for a, b in zip(row[:-1], row[1:])])
        assert other["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert list(tmp_path.iterdir()) == []  # the cache file is gone


def test_evaluate_set_without_cache_is_plain_perplexity():
    from quant.report import perplexity

    g = torch.Generator().manual_seed(2)
    table = torch.randn(30, 30, generator=g)
    blocks = torch.randint(0, 30, (2, 9), generator=g)
    ev = evaluate_set(_Table(table), blocks, "x", None, parent=False, progress=False)
    assert set(ev) == {"perplexity"}
    assert ev["perplexity"] == pytest.approx(perplexity(_Table(table), blocks, progress=False), rel=1e-6)


def test_divergence_between_two_checkpoints_cli(tiny_checkpoint, quantized, capsys):
    """python -m quant.divergence PARENT REF OTHER: a child against itself gives KL 0 and agreement 1; against
    the parent a positive KL."""
    import json

    from quant.divergence import main

    child = quantized("rtn:3:32")
    common = ["--eval-blocks", "3", "--eval-seq-len", "64", "--wikitext", "none"]
    assert main([str(tiny_checkpoint), str(child), str(child), *common]) == 0
    same = json.loads(capsys.readouterr().out)["sets"]["own"]
    assert same["kl_mean"] == 0.0 and same["top1_agreement"] == 1.0 and same["positions"] == 3 * 63
    assert same["perplexity_reference"] == same["perplexity_other"]
    assert main([str(tiny_checkpoint), str(tiny_checkpoint), str(child), *common]) == 0
    moved = json.loads(capsys.readouterr().out)["sets"]["own"]
    assert moved["kl_mean"] > 0 and moved["kl_p99"] >= moved["kl_mean"]
