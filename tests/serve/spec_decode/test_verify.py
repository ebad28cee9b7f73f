"""verify_drafts: an all-greedy step takes a shortcut (no distributions); it must emit exactly what the general
path (the speculative sampling rule's greedy limit in rejection.py) emits, logprobs included."""

from __future__ import annotations

import torch

from serve.spec_decode.verify import DraftsToVerify, verify_drafts
from serve.types import SamplingParams


def _requests(logits: torch.Tensor, plans: list[tuple[int, int]], params: list[SamplingParams]):
    """plans: (k drafts, how many of them match the target's argmax before a wrong one)."""
    out, row = [], 0
    argmax = logits.argmax(-1).tolist()
    for (k, good), p in zip(plans, params):
        drafts = [argmax[row + j] if j < good else (argmax[row + j] + 1) % logits.shape[1] for j in range(k)]
        out.append(DraftsToVerify(params=p, prompt_token_ids=[1, 2, 3], output_token_ids=[4], draft_token_ids=drafts,
                                  draft_probs=None))
        row += k + 1
    return out


def test_all_greedy_shortcut_equals_the_general_rule():
    torch.manual_seed(0)
    plans = [(0, 0), (3, 3), (4, 1), (2, 0), (5, 5)]
    logits = torch.randn(sum(k + 1 for k, _ in plans), 50)
    greedy = [SamplingParams(temperature=0.0, logprobs=2 if i % 2 else None) for i in range(len(plans))]
    fast = verify_drafts(logits, _requests(logits, plans, greedy), eos_token_ids=[0])
    # one sampled request in the batch sends everyone through the rule; the greedy rows must not change
    mixed_params = greedy + [SamplingParams(temperature=1.0)]
    mixed_plans = plans + [(2, 1)]
    mixed_logits = torch.cat([logits, torch.randn(3, 50)])
    general = verify_drafts(mixed_logits, _requests(mixed_logits, mixed_plans, mixed_params), eos_token_ids=[0])
    assert [v.num_accepted for v in fast] == [0, 3, 1, 0, 5]
    assert [len(v.token_ids) for v in fast] == [1, 4, 2, 1, 6]
    for a, b in zip(fast, general):
        assert a.token_ids == b.token_ids and a.num_accepted == b.num_accepted
        assert (a.logprobs is None) == (b.logprobs is None)
        if a.logprobs is not None:
            assert [lp.chosen.logprob for lp in a.logprobs] == [lp.chosen.logprob for lp in b.logprobs]
