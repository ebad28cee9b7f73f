"""Draft agreement: a model agrees with itself everywhere, a different model less, and the numbers are
the definitions computed by hand."""

from __future__ import annotations

import pytest
import torch

from lifecycle.draft_agreement import DraftAgreement, draft_agreement


def _model(micro_model_config, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(micro_model_config.to_hf(bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()


def test_a_model_agrees_with_itself(micro_model_config):
    model = _model(micro_model_config, 0)
    prompts = torch.randint(3, 400, (3, 5), generator=torch.Generator().manual_seed(0))
    res = draft_agreement(model, model, prompts, max_new_tokens=6)
    assert res.num_positions == 18
    assert res.greedy_agreement == 1.0 and res.sampling_acceptance == pytest.approx(1.0, abs=1e-5)
    assert res.expected_tokens_per_step(4) == 5.0


def test_agreement_matches_the_definition(micro_model_config):
    target, draft = _model(micro_model_config, 0), _model(micro_model_config, 1)
    prompts = torch.randint(3, 400, (2, 4), generator=torch.Generator().manual_seed(1))
    res = draft_agreement(target, draft, prompts, max_new_tokens=5)
    with torch.no_grad():  # by hand, without generate: greedy decoding one token at a time, no cache
        seqs = prompts.clone()
        for _ in range(5):
            seqs = torch.cat([seqs, target(input_ids=seqs).logits[:, -1:].argmax(-1)], dim=1)
        p = torch.softmax(target(input_ids=seqs).logits[:, 3:-1], -1)
        q = torch.softmax(draft(input_ids=seqs).logits[:, 3:-1], -1)
    assert res.greedy_agreement == pytest.approx(float((q.argmax(-1) == seqs[:, 4:]).float().mean()))
    assert res.sampling_acceptance == pytest.approx(float(torch.minimum(p, q).sum(-1).mean()), rel=1e-5)
    assert res.target_distinct_fraction == len(torch.unique(seqs[:, 4:])) / 10
    assert 0 <= res.greedy_agreement < 1


def test_expected_tokens_per_step():
    res = DraftAgreement(greedy_agreement=0.5, sampling_acceptance=0.5, target_distinct_fraction=1.0, num_positions=1)
    assert res.expected_tokens_per_step(4) == pytest.approx(1 + 0.5 + 0.25 + 0.125 + 0.0625)
