"""Verification of one step's drafts: target logits at the k+1 positions -> the tokens each request emits.

The bridge between the sampler and the speculative sampling rule. For a request whose last token was
computed together with drafts x_1..x_k, the runner returns target logits at k+1 positions: position j
scores the token after (tokens so far, x_1..x_j). The rule (rejection.py; Leviathan et al. 2023,
Algorithm 1) needs p_1..p_{k+1} to be exactly what the non-speculative sampler would draw from at
each of those positions, *given that the drafts before it are accepted*. So each position is one
sampler row of its own, built as if x_1..x_j had already been generated:

  - penalties count output tokens + x_1..x_j (repetition/presence/frequency all see the drafts);
  - the min_tokens mask bans EOS/stop ids while len(output) + j < min_tokens;
  - greedy rows take the same argmax of the processed logits as `sample_batch` (`target_argmax_ids`),
    so greedy output is token-for-token the non-speculative greedy output;
  - logprobs of an emitted token are the raw log_softmax at its own position, as `sample_batch` does.

Position j's distribution is only ever used when x_1..x_j were all accepted (the rule stops at the
first rejection), so conditioning on them is exact, and speculation stays lossless for every
sampling parameter; nothing needs to be disabled for penalties, min_tokens or logprobs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from serve.spec_decode.rejection import rejection_sample
from serve.types import Logprobs, SamplingParams
from serve.worker import sampler as sampling


@dataclass(frozen=True)
class DraftsToVerify:
    """One request's verification inputs; its target logits rows are p_1..p_{len(drafts)+1}."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # generated so far, before the drafts
    draft_token_ids: Sequence[int]
    draft_probs: torch.Tensor | None  # (k, V) the distributions the drafts were drawn from; None = point mass
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class VerifiedTokens:
    token_ids: list[int]  # the accepted drafts, then one token sampled by the target (1..k+1 tokens)
    num_accepted: int
    logprobs: list[Logprobs] | None  # one per emitted token when the request asked for logprobs


def verify_drafts(logits: torch.Tensor, requests: Sequence[DraftsToVerify], *, eos_token_ids: Sequence[int],
                  ) -> list[VerifiedTokens]:
    """logits (sum_b (k_b + 1), V): request b's k_b + 1 rows, consecutive, in order -> what each emits."""
    vocab_size = logits.shape[-1]
    device = logits.device
    num_positions = [len(r.draft_token_ids) + 1 for r in requests]
    if logits.shape[0] != sum(num_positions):
        raise ValueError(f"verify_drafts: {logits.shape[0]} logits rows for {sum(num_positions)} positions")
    row_params, row_prompts, row_outputs, row_generators = [], [], [], []
    for r in requests:
        p = r.params
        needs_ids = p.needs_penalties or p.min_tokens > 0  # only these read the token ids
        for j in range(len(r.draft_token_ids) + 1):
            row_params.append(p)
            row_prompts.append(r.prompt_token_ids if p.needs_penalties else ())
            row_outputs.append([*r.output_token_ids, *r.draft_token_ids[:j]] if needs_ids else ())
            row_generators.append(r.generator)
    meta = sampling.SamplingMetadata.from_params(row_params, vocab_size=vocab_size, device=device,
                                                 prompt_token_ids=row_prompts, output_token_ids=row_outputs,
                                                 eos_token_ids=eos_token_ids, generators=row_generators)
    raw = logits.float()  # (R, V)
    processed = sampling.process_logits(raw, meta)  # (R, V): penalties + min_tokens mask, per position
    argmax_ids = processed.argmax(dim=-1)  # (R,) what greedy sampling would pick at each position
    if all(r.params.is_greedy for r in requests):
        # The rule's greedy limit (rejection.py) without its (B, K+1, V) distributions: accept while the draft is
        # the argmax, then emit the argmax at the first mismatch, or the bonus argmax.
        emitted, num_accepted, start = [], [], 0
        targets = argmax_ids.tolist()
        for r, n in zip(requests, num_positions):
            row = targets[start:start + n]
            accepted = next((j for j, x in enumerate(r.draft_token_ids) if x != row[j]), n - 1)
            emitted.append([*r.draft_token_ids[:accepted], row[accepted]])
            num_accepted.append(accepted)
            start += n
        return _with_logprobs(requests, raw, num_positions, emitted, num_accepted)
    probs = sampling.sampling_probs(processed, meta)  # (R, V) p_j, normalized

    # Ragged rows -> the padded (B, K+1, ...) layout rejection_sample takes.
    num_rows, width = len(requests), max(num_positions)
    batch_index = torch.tensor([b for b, n in enumerate(num_positions) for _ in range(n)], device=device)  # (R,)
    slot_index = torch.tensor([j for n in num_positions for j in range(n)], device=device)  # (R,)
    target_probs = probs.new_zeros(num_rows, width, vocab_size)  # (B, K+1, V)
    target_probs[batch_index, slot_index] = probs
    target_argmax = argmax_ids.new_zeros(num_rows, width)  # (B, K+1)
    target_argmax[batch_index, slot_index] = argmax_ids
    draft_ids = torch.tensor([list(r.draft_token_ids) + [0] * (width - n) for r, n in zip(requests, num_positions)],
                             dtype=torch.long, device=device)  # (B, K)
    draft_probs = None
    if any(r.draft_probs is not None for r in requests):
        draft_probs = probs.new_zeros(num_rows, width - 1, vocab_size)  # (B, K, V)
        for b, r in enumerate(requests):
            k = len(r.draft_token_ids)
            # a point-mass row among model drafts: q = onehot(x), its true (deterministic) distribution
            draft_probs[b, :k] = (r.draft_probs.to(device=device, dtype=probs.dtype) if r.draft_probs is not None
                                  else torch.nn.functional.one_hot(draft_ids[b, :k], vocab_size).to(probs.dtype))
    out = rejection_sample(target_probs, draft_ids, draft_probs,
                           torch.tensor([n - 1 for n in num_positions], device=device),
                           torch.tensor([r.params.is_greedy for r in requests], device=device),
                           [r.generator for r in requests], target_argmax_ids=target_argmax)
    return _with_logprobs(requests, raw, num_positions, out.to_lists(), out.num_accepted.tolist())


def _with_logprobs(requests: Sequence[DraftsToVerify], raw: torch.Tensor, num_positions: list[int],
                   emitted: list[list[int]], num_accepted: list[int]) -> list[VerifiedTokens]:
    """Logprobs of the emitted tokens (raw log_softmax at their own positions) for requests that asked."""
    device = raw.device
    num_rows = len(requests)
    logprobs: list[list[Logprobs] | None] = [None] * num_rows
    wanting = [b for b, r in enumerate(requests) if r.params.logprobs is not None]
    if wanting:
        starts = [sum(num_positions[:b]) for b in range(num_rows)]
        rows = [starts[b] + j for b in wanting for j in range(len(emitted[b]))]
        chosen = torch.tensor([t for b in wanting for t in emitted[b]], device=device)  # (E,)
        num_top = [requests[b].params.logprobs for b in wanting for _ in emitted[b]]
        flat = sampling.compute_logprobs(raw[rows], chosen, max(num_top)).to_logprobs(chosen, num_top)
        offset = 0
        for b in wanting:
            logprobs[b] = flat[offset:offset + len(emitted[b])]
            offset += len(emitted[b])
    return [VerifiedTokens(tokens, accepted, lp) for tokens, accepted, lp in zip(emitted, num_accepted, logprobs)]
