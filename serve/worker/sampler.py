"""The sampler: logits of one step's batch -> one token per row, as pure tensor functions.

One row per sequence sampled this step (B rows, vocabulary V). Parameters vary per row, so each is a
(B,) tensor and every function is vectorized over rows; no Python loop touches the vocabulary. The
only Python loop is over *seeded* rows, to draw their noise from their own generator.

Pipeline (`sample_batch`), every step out-of-place so the raw logits survive for logprobs:

    raw logits ─┬─▶ compute_logprobs            log_softmax of the *raw* logits (vLLM's default
                │                               "raw_logprobs": what the model thinks, before any
                │                               penalty or filter; what evaluation needs)
                └─▶ process_logits              apply_penalties (repetition, then presence/frequency),
                      │                         apply_min_tokens_mask
                      ├─▶ argmax                greedy rows (ties -> lowest id, torch.argmax's rule)
                      └─▶ sampling_probs        apply_temperature, apply_top_k, apply_top_p, apply_min_p
                            └─▶ sample          (transformers' warper order), softmax, exponential race

`process_logits` + `sampling_probs` are the target distribution the speculative rejection sampler
needs too. `SamplingMetadata` is built once per step from the batch's SamplingParams; its flags let
the hot path skip every stage no row needs.

Tie rules (deterministic, independent of token ids and of the batch):
  top-k   keep every token whose logit >= the k-th largest: ties at the boundary are all kept
          (transformers' TopKLogitsWarper and vLLM do the same), so more than k may survive.
  top-p   sort descending, find the first position where the cumulative mass reaches top_p; keep every
          token whose probability >= the probability there (ties at the boundary all kept, so the
          kept set never depends on how the sort ordered equal values).
  min-p   keep tokens with p >= min_p * max p, compared as logit >= max logit + log(min_p).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple

import torch

from serve.types import GREEDY_TEMPERATURE_EPS, Logprobs, SamplingParams, TokenLogprob

TokenIdRows = Sequence[Sequence[int]]  # ragged: one list of token ids per row


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A request's own generator; the caller keeps it for the request's life and passes it each step."""
    return torch.Generator(device=device).manual_seed(seed)


# -- penalties and masks (on the processed logits; greedy sees them too) ------------------------------


def token_counts(token_ids: TokenIdRows, vocab_size: int, device: torch.device) -> torch.Tensor:
    """(B, V) int32: how often each token id occurs in each row. One flat index_add, no padding."""
    num_rows = len(token_ids)
    counts = torch.zeros(num_rows, vocab_size, dtype=torch.int32, device=device)  # (B, V)
    lengths = [len(row) for row in token_ids]
    if sum(lengths) == 0:
        return counts
    ids = torch.tensor(list(chain.from_iterable(token_ids)), dtype=torch.int64, device=device)  # (N,)
    row_offsets = torch.arange(num_rows, device=device) * vocab_size  # (B,)
    flat_index = ids + row_offsets.repeat_interleave(torch.tensor(lengths, device=device))  # (N,)
    counts.view(-1).index_add_(0, flat_index, torch.ones_like(flat_index, dtype=torch.int32))
    return counts


def apply_penalties_from_counts(logits: torch.Tensor, prompt_mask: torch.Tensor, output_counts: torch.Tensor,
                                repetition_penalty: torch.Tensor, presence_penalty: torch.Tensor,
                                frequency_penalty: torch.Tensor) -> torch.Tensor:
    """logits (B, V); prompt_mask (B, V) bool; output_counts (B, V); penalties (B,) with 1, 0, 0 = off.

    Repetition (CTRL, Keskar et al. 2019 §4.1, as transformers' RepetitionPenaltyLogitsProcessor): for
    every token seen in prompt + output, a positive logit is divided by the penalty, a negative one
    multiplied. Then OpenAI's rule on output tokens only (platform.openai.com/docs/advanced-usage,
    "frequency and presence penalties"): logit -= frequency * count + presence * [count > 0].
    """
    is_in_output = output_counts > 0  # (B, V)
    is_seen = prompt_mask | is_in_output  # (B, V)
    repetition = repetition_penalty.unsqueeze(1)  # (B, 1)
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)  # (B, V)
    logits = torch.where(is_seen, penalized, logits)  # (B, V)
    return (logits - frequency_penalty.unsqueeze(1) * output_counts
            - presence_penalty.unsqueeze(1) * is_in_output)  # (B, V)


def apply_penalties(logits: torch.Tensor, prompt_token_ids: TokenIdRows, output_token_ids: TokenIdRows,
                    repetition_penalty: torch.Tensor, presence_penalty: torch.Tensor,
                    frequency_penalty: torch.Tensor) -> torch.Tensor:
    """`apply_penalties_from_counts` with the counts built from ragged token-id rows (B rows each)."""
    vocab_size = logits.shape[-1]
    prompt_mask = token_counts(prompt_token_ids, vocab_size, logits.device) > 0  # (B, V)
    output_counts = token_counts(output_token_ids, vocab_size, logits.device)  # (B, V)
    return apply_penalties_from_counts(logits, prompt_mask, output_counts, repetition_penalty,
                                       presence_penalty, frequency_penalty)


def apply_min_tokens_mask(logits: torch.Tensor, row_ids: Sequence[int],
                          banned_token_ids: TokenIdRows) -> torch.Tensor:
    """logits (B, V) with `banned_token_ids[i]` set to -inf in row `row_ids[i]`: the rows that have not
    yet generated `min_tokens` cannot emit EOS or a stop token id (vLLM's MinTokensLogitsProcessor)."""
    lengths = [len(ids) for ids in banned_token_ids]
    if sum(lengths) == 0:
        return logits
    rows = torch.tensor(row_ids, dtype=torch.int64, device=logits.device)  # (R,)
    rows = rows.repeat_interleave(torch.tensor(lengths, device=logits.device))  # (N,)
    cols = torch.tensor(list(chain.from_iterable(banned_token_ids)), dtype=torch.int64,
                        device=logits.device)  # (N,)
    return logits.index_put((rows, cols), torch.tensor(float("-inf"), device=logits.device))


# -- temperature and filters (sampled rows only; each leaves a row with the "off" value untouched) -----


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """logits (B, V) / temperature (B,); rows below GREEDY_TEMPERATURE_EPS (greedy) are left as they are."""
    is_greedy = temperature < GREEDY_TEMPERATURE_EPS  # (B,)
    divisor = torch.where(is_greedy, torch.ones_like(temperature), temperature)  # (B,)
    return logits / divisor.unsqueeze(1)  # (B, V)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int | None = None) -> torch.Tensor:
    """Keep logits >= each row's k-th largest (ties kept). top_k (B,) int; k >= V is off.

    `max_top_k` (the largest k among rows that use it, known on the host from the params) bounds the
    topk call; without it, it is read from `top_k` (a device sync on CUDA).
    """
    vocab_size = logits.shape[-1]
    is_off = top_k >= vocab_size  # (B,)
    k = torch.where(is_off, torch.ones_like(top_k), top_k)  # (B,) safe gather index for "off" rows
    if max_top_k is None:
        max_top_k = int(k.max())
    top_values = logits.topk(min(max_top_k, vocab_size), dim=-1).values  # (B, max_k), descending
    threshold = top_values.gather(1, (k - 1).unsqueeze(1))  # (B, 1): the k-th largest logit
    threshold = threshold.masked_fill(is_off.unsqueeze(1), float("-inf"))  # (B, 1)
    return logits.masked_fill(logits < threshold, float("-inf"))  # (B, V)


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020, §3.1), ties at the boundary kept. top_p (B,); 1 is off."""
    vocab_size = logits.shape[-1]
    probs = logits.softmax(dim=-1)  # (B, V)
    sorted_probs = probs.sort(dim=-1, descending=True).values  # (B, V)
    cumulative = sorted_probs.cumsum(dim=-1)  # (B, V)
    # first sorted position whose cumulative mass reaches top_p (clamped: float sums may fall short)
    boundary = (cumulative < top_p.unsqueeze(1)).sum(dim=-1).clamp(max=vocab_size - 1)  # (B,)
    threshold = sorted_probs.gather(1, boundary.unsqueeze(1))  # (B, 1)
    # top_p = 1 keeps everything, even tokens a float32 cumsum that reaches 1 early would cut
    threshold = threshold.masked_fill((top_p >= 1.0).unsqueeze(1), 0.0)  # (B, 1)
    return logits.masked_fill(probs < threshold, float("-inf"))  # (B, V)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Min-p (Nguyen et al. 2024): keep p >= min_p * max p, i.e. logit >= max logit + log(min_p).
    min_p (B,); 0 is off (log 0 = -inf keeps every token). No softmax needed."""
    max_logit = logits.max(dim=-1, keepdim=True).values  # (B, 1)
    threshold = max_logit + min_p.log().unsqueeze(1)  # (B, 1)
    return logits.masked_fill(logits < threshold, float("-inf"))  # (B, V)


# -- drawing and logprobs ------------------------------------------------------------------------------


def sample(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row from probs (B, V) (rows need not be normalized) -> (B,) int64.

    Exponential race: with E_v ~ Exp(1) i.i.d., argmax_v p_v / E_v is v with probability p_v / sum p
    (E_v / p_v ~ Exp(p_v); the smallest of independent exponentials is v with that probability). It is
    the Gumbel-max trick without logs; vLLM samples this way. A row with a generator draws its V noise
    values from it alone, so a seeded request gets the same tokens whatever else is in the batch; other
    rows use the device's default generator.
    """
    if len(generators) != probs.shape[0]:
        raise ValueError(f"sample: {len(generators)} generators for {probs.shape[0]} rows")
    noise = torch.empty_like(probs)  # (B, V)
    if any(generator is None for generator in generators):
        noise.exponential_()
    for row, generator in enumerate(generators):
        if generator is not None:
            noise[row].exponential_(generator=generator)
    # a zero draw would turn p = 0 into 0 / 0 = nan
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)  # (B,)


class LogprobsTensors(NamedTuple):
    chosen_logprobs: torch.Tensor  # (B,) float32
    top_logprobs: torch.Tensor  # (B, k) float32, descending
    top_token_ids: torch.Tensor  # (B, k) int64
    chosen_ranks: torch.Tensor  # (B,) int64: 1 + number of tokens with a strictly larger logprob

    def to_logprobs(self, chosen_token_ids: torch.Tensor, num_top_per_row: Sequence[int]) -> list[Logprobs]:
        """The boundary type, one per row, row i keeping its first `num_top_per_row[i]` alternatives
        (one host transfer per tensor, not per row)."""
        chosen_ids = chosen_token_ids.tolist()
        chosen_values = self.chosen_logprobs.tolist()
        ranks = self.chosen_ranks.tolist()
        top_values = self.top_logprobs.tolist()
        top_ids = self.top_token_ids.tolist()
        return [Logprobs(chosen=TokenLogprob(chosen_ids[row], chosen_values[row], ranks[row]),
                         top=_top_token_logprobs(top_ids[row][:num_top], top_values[row][:num_top]))
                for row, num_top in enumerate(num_top_per_row)]


def _top_token_logprobs(token_ids: list[int], values: list[float]) -> tuple[TokenLogprob, ...]:
    """Descending top-k entries with the same rank rule as the chosen token: any token more likely than
    a top-k member is itself in the top k, so its rank is 1 + its first equal value's position."""
    entries: list[TokenLogprob] = []
    for position, (token_id, value) in enumerate(zip(token_ids, values)):
        rank = entries[-1].rank if entries and entries[-1].logprob == value else position + 1
        entries.append(TokenLogprob(token_id, value, rank))
    return tuple(entries)


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> LogprobsTensors:
    """log_softmax of logits (N, V) at token_ids (N,), their rank, and the `num_top` most likely.

    N is any set of positions: the B sampled rows, or a prompt's positions with the next prompt tokens
    (prompt logprobs). Computed in float32 whatever the logits' dtype.
    """
    logprobs = logits.float().log_softmax(dim=-1)  # (N, V)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))  # (N, 1)
    ranks = (logprobs > chosen).sum(dim=-1) + 1  # (N,)
    top = logprobs.topk(min(num_top, logprobs.shape[-1]), dim=-1)  # (N, k) values and ids
    return LogprobsTensors(chosen.squeeze(1), top.values, top.indices, ranks)


# -- the batch -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingMetadata:
    """Per-row sampling parameters of one step as tensors on the logits' device, plus flags saying which
    stages any row needs (a None tensor = no row needs that stage). Build with `from_params`."""

    temperature: torch.Tensor  # (B,) float32; greedy rows hold their (tiny) temperature, left untouched
    is_greedy: torch.Tensor  # (B,) bool
    all_greedy: bool
    all_random: bool
    top_k: torch.Tensor | None  # (B,) int64; rows without top-k hold vocab_size (off)
    max_top_k: int | None
    top_p: torch.Tensor | None  # (B,) float32; 1 = off
    min_p: torch.Tensor | None  # (B,) float32; 0 = off
    repetition_penalty: torch.Tensor | None  # (B,) float32; the three are set together
    presence_penalty: torch.Tensor | None
    frequency_penalty: torch.Tensor | None
    prompt_token_ids: TokenIdRows  # rows without penalties are empty (no counting work)
    output_token_ids: TokenIdRows
    min_tokens_row_ids: tuple[int, ...]  # rows that may not stop yet ...
    min_tokens_banned_token_ids: tuple[tuple[int, ...], ...]  # ... and the ids each may not emit
    generators: tuple[torch.Generator | None, ...]  # (B,) per-request generators, None = unseeded
    max_num_logprobs: int | None  # the largest `logprobs` in the batch; None = no row asked

    @property
    def num_rows(self) -> int:
        return self.temperature.shape[0]

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty is not None

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], *, vocab_size: int, device: torch.device | str,
                    prompt_token_ids: TokenIdRows, output_token_ids: TokenIdRows,
                    eos_token_ids: Sequence[int] = (),
                    generators: Sequence[torch.Generator | None] | None = None) -> SamplingMetadata:
        """One row per entry of `params`, with that row's prompt and generated-so-far token ids.

        `eos_token_ids`: the model's EOS ids (generation_config may list several), banned with the row's
        stop_token_ids while it has generated fewer than min_tokens (unless it ignores EOS).
        `generators[i]`: the generator the caller keeps for a seeded request (`make_generator`).
        """
        num_rows = len(params)
        if not len(prompt_token_ids) == len(output_token_ids) == num_rows:
            raise ValueError(f"SamplingMetadata: {num_rows} params, {len(prompt_token_ids)} prompts, "
                             f"{len(output_token_ids)} outputs: give one of each per row")
        generators = tuple(generators) if generators is not None else (None,) * num_rows
        for row, p in enumerate(params):
            if p.seed is not None and not p.is_greedy and generators[row] is None:
                raise ValueError(f"row {row} has seed={p.seed} but no generator: pass make_generator(seed)")

        def floats(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)  # (B,)

        is_greedy = [p.is_greedy for p in params]
        sampled = [p for p in params if not p.is_greedy]
        top_ks = [p.top_k for p in sampled if p.top_k is not None and p.top_k < vocab_size]
        needs_penalties = [p.needs_penalties for p in params]

        min_tokens_rows: list[int] = []
        min_tokens_banned: list[tuple[int, ...]] = []
        for row, p in enumerate(params):
            if len(output_token_ids[row]) < p.min_tokens:
                banned = tuple(dict.fromkeys((*p.stop_token_ids, *(() if p.ignore_eos else eos_token_ids))))
                if banned:
                    min_tokens_rows.append(row)
                    min_tokens_banned.append(banned)

        # greedy rows get the "off" value of every filter: their argmax is taken before the filters
        num_logprobs = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=floats([p.temperature for p in params]),
            is_greedy=torch.tensor(is_greedy, dtype=torch.bool, device=device),
            all_greedy=all(is_greedy),
            all_random=not any(is_greedy),
            top_k=(torch.tensor([vocab_size if g or p.top_k is None else min(p.top_k, vocab_size)
                                 for g, p in zip(is_greedy, params)], dtype=torch.int64, device=device)
                   if top_ks else None),
            max_top_k=max(top_ks) if top_ks else None,
            top_p=(floats([1.0 if g else p.top_p for g, p in zip(is_greedy, params)])
                   if any(p.top_p < 1.0 for p in sampled) else None),
            min_p=(floats([0.0 if g else p.min_p for g, p in zip(is_greedy, params)])
                   if any(p.min_p > 0.0 for p in sampled) else None),
            repetition_penalty=floats([p.repetition_penalty for p in params]) if any(needs_penalties) else None,
            presence_penalty=floats([p.presence_penalty for p in params]) if any(needs_penalties) else None,
            frequency_penalty=floats([p.frequency_penalty for p in params]) if any(needs_penalties) else None,
            prompt_token_ids=[ids if needs else () for ids, needs in zip(prompt_token_ids, needs_penalties)],
            output_token_ids=[ids if needs else () for ids, needs in zip(output_token_ids, needs_penalties)],
            min_tokens_row_ids=tuple(min_tokens_rows),
            min_tokens_banned_token_ids=tuple(min_tokens_banned),
            generators=generators,
            max_num_logprobs=max(num_logprobs) if num_logprobs else None,
        )


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: torch.Tensor  # (B,) int64
    logprobs: LogprobsTensors | None  # k = meta.max_num_logprobs; None when no row asked


def process_logits(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Penalties and the min_tokens mask: the logits greedy takes its argmax of. (B, V) -> (B, V)."""
    if meta.needs_penalties:
        logits = apply_penalties(logits, meta.prompt_token_ids, meta.output_token_ids,
                                 meta.repetition_penalty, meta.presence_penalty, meta.frequency_penalty)
    if meta.min_tokens_row_ids:
        logits = apply_min_tokens_mask(logits, meta.min_tokens_row_ids, meta.min_tokens_banned_token_ids)
    return logits


def sampling_probs(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Processed logits (B, V) -> the distribution sampled rows draw from (B, V), normalized."""
    logits = apply_temperature(logits, meta.temperature)
    if meta.top_k is not None:
        logits = apply_top_k(logits, meta.top_k, meta.max_top_k)
    if meta.top_p is not None:
        logits = apply_top_p(logits, meta.top_p)
    if meta.min_p is not None:
        logits = apply_min_p(logits, meta.min_p)
    return logits.softmax(dim=-1)  # (B, V)


def sample_batch(logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
    """logits (B, V), any float dtype, any device -> one token per row (+ raw logprobs if asked)."""
    raw_logits = logits.float()  # (B, V): half-precision logits would blur ties and top-p mass
    processed = process_logits(raw_logits, meta)  # (B, V)
    greedy_ids = None if meta.all_random else processed.argmax(dim=-1)  # (B,)
    if meta.all_greedy:
        token_ids = greedy_ids
    else:
        sampled_ids = sample(sampling_probs(processed, meta), meta.generators)  # (B,)
        token_ids = sampled_ids if greedy_ids is None else torch.where(meta.is_greedy, greedy_ids, sampled_ids)
    logprobs = (compute_logprobs(raw_logits, token_ids, meta.max_num_logprobs)
                if meta.max_num_logprobs is not None else None)
    return SamplerOutput(token_ids=token_ids, logprobs=logprobs)
