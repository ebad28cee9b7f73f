"""Lossless verification of draft tokens: the speculative sampling rule, as pure batched functions.

Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding" (§2.3, Algorithm 1);
Chen et al. 2023, "Accelerating LLM Decoding with Speculative Sampling" (Algorithm 2; there p and q swap
names: their q is the target). For the k draft tokens x_1..x_k of one request, with draft distributions
q_i and target distributions p_i (p_i conditioned on the prefix and x_<i, so all k+1 of them come from
one target forward pass):

    for i in 1..k:
        accept x_i with probability min(1, p_i(x_i) / q_i(x_i))
        on the first rejection: emit x ~ norm(max(0, p_i - q_i)) and stop
    if all k were accepted: emit a bonus token x ~ p_{k+1}

Every step emits 1..k+1 tokens and the emitted sequence has exactly the target's distribution
(Leviathan et al. Appendix A.1; Chen et al. Theorem 1). The expected acceptance rate of one draft is
alpha = sum_x min(p(x), q(x)) = 1 - TV(p, q) (Leviathan et al. §3.3, Theorem 3.5 and Lemma 3.3), and a
step emits (1 - alpha^(k+1)) / (1 - alpha) tokens on average (§3.1, Equation 1).

Point-mass drafts (n-gram / prompt lookup: no distribution, the proposal is deterministic given the
context) are the special case q_i = onehot(x_i), which is the proposer's true distribution, so the
theorem applies unchanged and the rule simplifies to:
    accept with probability min(1, p_i(x_i) / 1) = p_i(x_i);
    residual max(0, p_i - onehot(x_i)) is p_i(x) for x != x_i and max(0, p_i(x_i) - 1) = 0 at x_i,
    with total mass 1 - p_i(x_i): resample from p_i with x_i removed, renormalised.
Check: P(emit y) = p(x_i) [y = x_i] + (1 - p(x_i)) * p(y) / (1 - p(x_i)) [y != x_i] = p(y).

Greedy rows (temperature 0) take the limit of the rule: accept while x_i == argmax p_i, emit argmax p_i
at the first mismatch (or the bonus argmax), which is token-for-token the non-speculative greedy output
provided both take the same argmax: pass the sampler's greedy ids as `target_argmax_ids` (ties go to
the lowest token id in both).

`target_probs` are the final sampling distributions (after temperature, top-k/top-p/min-p, penalties);
`draft_probs` must be the draft's distributions under the same processing, and x_i must have been
sampled from them. Randomness: each seeded row draws, from its own generator and in this order, one
uniform per draft it has (not per padded slot, so its result does not depend on the rest of the batch)
and then one exponential per vocabulary entry for its final token; unseeded rows share one batched draw
from torch's default generator; greedy rows draw nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RejectionSampleOutput:
    """Tokens one verification step emits per request.

    Row b's emitted tokens are `token_ids[b, :num_emitted[b]]`: its `num_accepted[b]` accepted drafts
    followed by one token sampled by the target (the correction token, or the bonus token when every
    draft was accepted). Slots past `num_emitted[b]` are padding holding 0: read them only through
    `num_emitted` or `to_lists()`.
    """

    token_ids: torch.Tensor  # (B, K+1) int64
    num_emitted: torch.Tensor  # (B,) int64, = num_accepted + 1, in [1, num_draft_tokens + 1]
    num_accepted: torch.Tensor  # (B,) int64, in [0, num_draft_tokens]

    def to_lists(self) -> list[list[int]]:
        """The emitted tokens of each row, padding dropped."""
        rows = self.token_ids.tolist()
        return [row[:n] for row, n in zip(rows, self.num_emitted.tolist(), strict=True)]


def expected_acceptance_rate(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """alpha = sum_x min(p(x), q(x)) over the last dim (Leviathan et al. §3.3, Theorem 3.5)."""
    return torch.minimum(target_probs, draft_probs).sum(-1)  # (...,)


def expected_num_emitted(acceptance_rate: float, num_draft_tokens: int) -> float:
    """Mean tokens per step with k drafts of i.i.d. acceptance rate alpha: (1 - a^(k+1)) / (1 - a) (Eq. 1)."""
    if acceptance_rate >= 1.0:
        return float(num_draft_tokens + 1)
    return (1.0 - acceptance_rate ** (num_draft_tokens + 1)) / (1.0 - acceptance_rate)


def rejection_sample(
    target_probs: torch.Tensor,
    draft_token_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    num_draft_tokens: torch.Tensor,
    is_greedy: torch.Tensor,
    generators: Sequence[torch.Generator | None],
    *,
    target_argmax_ids: torch.Tensor | None = None,
) -> RejectionSampleOutput:
    """Verify a ragged batch of drafts against the target (module docstring for the rule and RNG use).

    target_probs      (B, K+1, V) p_1..p_{K+1}; row b reads positions 0..num_draft_tokens[b]
    draft_token_ids   (B, K) int; row b's drafts are the first num_draft_tokens[b], the rest is ignored
    draft_probs       (B, K, V) q_1..q_K, or None for point-mass (deterministic) proposers
    num_draft_tokens  (B,) int in [0, K]; 0 = plain sampling from p_1 (speculation off for that row)
    is_greedy         (B,) bool; greedy rows use argmax and ignore draft_probs and their generator
    generators        B entries; a row's generator (on target_probs' device) makes all its draws
    target_argmax_ids (B, K+1) int, optional: the greedy token at each position as the non-speculative
                      sampler picks it (serve.worker.sampler takes argmax of the processed logits, and
                      softmax rounding can tie two close logits); default argmax of target_probs
    """
    num_rows, num_positions, vocab_size = target_probs.shape
    num_slots = num_positions - 1  # K
    _check_shapes(target_probs, draft_token_ids, draft_probs, num_draft_tokens, is_greedy, generators,
                  target_argmax_ids)
    device = target_probs.device
    work_dtype = torch.promote_types(target_probs.dtype, torch.float32)  # fp16/bf16 probs: compare in fp32
    p = target_probs.to(work_dtype)  # (B, K+1, V)
    q = None if draft_probs is None else draft_probs.to(work_dtype)  # (B, K, V)
    num_drafts = num_draft_tokens.to(device=device, dtype=torch.long)  # (B,)
    is_greedy = is_greedy.to(device=device, dtype=torch.bool)  # (B,)
    rows = torch.arange(num_rows, device=device)  # (B,)

    slots = torch.arange(num_slots, device=device)  # (K,)
    is_real_draft = slots[None, :] < num_drafts[:, None]  # (B, K)
    draft_ids = torch.where(is_real_draft, draft_token_ids.to(device=device, dtype=torch.long), 0)  # (B, K)
    uniforms, exponentials = _draw_random(num_rows, num_slots, vocab_size, num_drafts, is_greedy, generators,
                                          device, work_dtype)  # (B, K), (B, V)

    # Algorithm 1, accept step: r ~ U(0, 1), accept iff r < p(x) / q(x). Written as r * q(x) < p(x) so
    # a p(x) = 0 token is never accepted and no division by q is needed; q(x) = 1 for point masses.
    p_of_draft = p[:, :num_slots].gather(-1, draft_ids[..., None]).squeeze(-1)  # (B, K)
    q_of_draft = (torch.ones_like(p_of_draft) if q is None
                  else q.gather(-1, draft_ids[..., None]).squeeze(-1))  # (B, K)
    is_accepted_sampled = uniforms * q_of_draft < p_of_draft  # (B, K)
    target_argmax = (p.argmax(-1) if target_argmax_ids is None
                     else target_argmax_ids.to(device=device, dtype=torch.long))  # (B, K+1)
    is_accepted_greedy = draft_ids == target_argmax[:, :num_slots]  # (B, K)
    is_accepted = torch.where(is_greedy[:, None], is_accepted_greedy, is_accepted_sampled) & is_real_draft  # (B, K)
    # Only the leading run counts: everything after the first rejection was drafted from a wrong prefix.
    num_accepted = is_accepted.long().cumprod(-1).sum(-1)  # (B,)

    # The one target-sampled token: at the first rejected slot from norm(max(0, p - q)) (Algorithm 1,
    # "adjust the distribution"), or the bonus token from p_{n+1} when all n drafts were accepted.
    p_next = p[rows, num_accepted]  # (B, V)
    is_rejected = num_accepted < num_drafts  # (B,)
    if num_slots > 0:
        slot = num_accepted.clamp(max=num_slots - 1)  # (B,) rows with is_rejected index a real slot
        q_next = (torch.nn.functional.one_hot(draft_ids[rows, slot], vocab_size).to(work_dtype) if q is None
                  else q[rows, slot])  # (B, V)
        residual = (p_next - q_next).clamp_min(0.0)  # (B, V)
        # Mass 0 means p <= q everywhere, i.e. p == q, where a rejection has probability 0; rounding
        # can still reject, and p itself is then the right distribution.
        has_residual_mass = residual.sum(-1, keepdim=True) > 0  # (B, 1)
        final_dist = torch.where(is_rejected[:, None] & has_residual_mass, residual, p_next)  # (B, V)
    else:
        final_dist = p_next  # (B, V)
    # Exponential race: argmax_x w(x) / E_x with E_x ~ Exp(1) i.i.d. picks x with probability
    # w(x) / sum(w), since E_x / w(x) ~ Exp(rate w(x)) and the minimum of independent exponentials is x
    # w.p. rate_x / sum(rates). No normalisation needed; w(x) = 0 is never picked.
    sampled = (final_dist / exponentials).argmax(-1)  # (B,)
    final_token = torch.where(is_greedy, target_argmax[rows, num_accepted], sampled)  # (B,)

    positions = torch.arange(num_positions, device=device)  # (K+1,)
    draft_ids_wide = torch.nn.functional.pad(draft_ids, (0, 1))  # (B, K+1)
    token_ids = torch.where(positions[None, :] < num_accepted[:, None], draft_ids_wide, 0)  # (B, K+1)
    token_ids[rows, num_accepted] = final_token
    return RejectionSampleOutput(token_ids=token_ids, num_emitted=num_accepted + 1, num_accepted=num_accepted)


def _draw_random(num_rows: int, num_slots: int, vocab_size: int, num_drafts: torch.Tensor,
                 is_greedy: torch.Tensor, generators: Sequence[torch.Generator | None],
                 device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniforms for the accept tests and Exp(1) noise for the final sample; see the module docstring."""
    uniforms = torch.zeros(num_rows, num_slots, device=device, dtype=dtype)  # (B, K); greedy rows: unused
    exponentials = torch.ones(num_rows, vocab_size, device=device, dtype=dtype)  # (B, V); greedy rows: unused
    greedy_flags = is_greedy.tolist()
    unseeded = [b for b, (g, greedy) in enumerate(zip(generators, greedy_flags, strict=True))
                if g is None and not greedy]
    if unseeded:  # one batched draw from the default generator; vLLM v1's sampler does the same
        index = torch.tensor(unseeded, device=device)  # (U,)
        uniforms[index] = torch.rand(len(unseeded), num_slots, device=device, dtype=dtype)  # (U, K)
        exponentials[index] = torch.empty(len(unseeded), vocab_size, device=device,
                                          dtype=dtype).exponential_()  # (U, V)
    for b, (generator, greedy, num) in enumerate(zip(generators, greedy_flags, num_drafts.tolist(), strict=True)):
        if generator is None or greedy:
            continue
        uniforms[b, :num] = torch.rand(num, generator=generator, device=device, dtype=dtype)  # (n_b,)
        exponentials[b].exponential_(generator=generator)  # (V,)
    # exponential_ can return exactly 0 (w / 0 = inf or nan); the smallest normal keeps the race finite.
    return uniforms, exponentials.clamp_min_(torch.finfo(dtype).tiny)


def _check_shapes(target_probs: torch.Tensor, draft_token_ids: torch.Tensor, draft_probs: torch.Tensor | None,
                  num_draft_tokens: torch.Tensor, is_greedy: torch.Tensor,
                  generators: Sequence[torch.Generator | None], target_argmax_ids: torch.Tensor | None) -> None:
    """Shape errors are the caller's bug; the message names the argument and both shapes."""
    if target_probs.dim() != 3:
        raise ValueError(f"target_probs must be (B, K+1, V), got shape {tuple(target_probs.shape)}")
    num_rows, num_positions, vocab_size = target_probs.shape
    expected = {
        "draft_token_ids": (draft_token_ids, (num_rows, num_positions - 1)),
        "num_draft_tokens": (num_draft_tokens, (num_rows,)),
        "is_greedy": (is_greedy, (num_rows,)),
    }
    if draft_probs is not None:
        expected["draft_probs"] = (draft_probs, (num_rows, num_positions - 1, vocab_size))
    if target_argmax_ids is not None:
        expected["target_argmax_ids"] = (target_argmax_ids, (num_rows, num_positions))
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} to match target_probs "
                             f"{tuple(target_probs.shape)}, got {tuple(tensor.shape)}")
    if len(generators) != num_rows:
        raise ValueError(f"generators must have one entry (or None) per row: {num_rows}, got {len(generators)}")
    if num_rows and (int(num_draft_tokens.min()) < 0 or int(num_draft_tokens.max()) > num_positions - 1):
        raise ValueError(f"num_draft_tokens must lie in [0, K={num_positions - 1}], got {num_draft_tokens.tolist()}")
