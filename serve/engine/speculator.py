"""Speculator: the engine's speculative-decoding policy around a `Proposer`.

Per step (vLLM v1's design, docs/ARCHITECTURE.md §3: drafts are just more tokens to compute):
  1. `propose(scheduler)` before scheduling: for every running sequence that is decoding (all but its
     last token computed, at least one token generated) and has speculation on, up to k drafts from
     the proposer, capped so that the step can never emit past max_tokens or the context
     (k <= tokens left - 1: a step emits at most k + 1). Returns seq_id -> drafts for the scheduler,
     which may cut them short (budget, free blocks; see scheduler.py).
  2. `verify(items, logits)` after the forward pass: the target's logits at each item's 1 + k
     positions -> the accepted drafts + one target-sampled token (serve/spec_decode/verify.py).
  3. `remove(seq_ids)` when a sequence finishes, aborts or is preempted (draft-model KV).

Turning speculation down under load. Verifying k drafts costs k extra target tokens per sequence and
step; that is free only while a step is latency-bound (weights read once, few tokens: decode of a small
batch). Once the step has enough real work, the extra tokens cost compute that the accepted drafts do
not repay, which is how speculative decoding slows vLLM users down at high load. So a step proposes
no drafts at all when either
  - more than `max_num_seqs` sequences are running (default 8 on CPU, where a handful of rows already
    fills the matmul units; 32 on CUDA, where decode stays memory-bound much longer), or
  - the step's non-speculative work, i.e. the tokens running sequences still have to compute plus the
    prompt tokens of waiting sequences, exceeds `max_budget_fraction` of max_num_batched_tokens
    (prefill traffic: the step is compute-bound already and drafts would only make it slower).
The drafts of a speculating step only take budget and KV blocks nobody else asked for (the scheduler
schedules them after admissions and never preempts for them). `EngineStats` counts drafted and
accepted tokens; `num_steps_turned_down_total` counts the steps the rule said no.

Seeds: a seeded request is reproducible run to run as long as the same steps speculate, since drafts
and verification draw from its generator in another order than plain sampling. Whether a step
speculates depends on the load, so a seeded sampled request can come out differently on a quiet and on
a busy engine (with the same distribution); greedy output never depends on it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence as Seq
from typing import TYPE_CHECKING

import torch

from serve.engine.scheduler import ScheduledSeq, Scheduler
from serve.engine.sequence import Sequence
from serve.spec_decode.proposer import ProposalInput, Proposer
from serve.spec_decode.verify import DraftsToVerify, VerifiedTokens, verify_drafts

if TYPE_CHECKING:
    from serve.engine.llm_engine import EngineConfig
    from serve.worker.model_runner import ModelRunner


class Speculator:
    def __init__(self, proposer: Proposer, *, num_speculative_tokens: int, max_num_seqs: int,
                 max_budget_fraction: float, is_default_on: bool, max_model_len: int,
                 eos_token_ids: Iterable[int]) -> None:
        self.proposer = proposer
        self.num_speculative_tokens = num_speculative_tokens
        self.max_num_seqs = max_num_seqs
        self.max_budget_fraction = max_budget_fraction
        self.is_default_on = is_default_on
        self.max_model_len = max_model_len
        self.eos_token_ids = sorted(eos_token_ids)
        self._draft_probs: dict[str, torch.Tensor] = {}  # seq_id -> (k, V) q of this step's drafts
        self.num_draft_tokens_total = 0  # drafts verified by the target
        self.num_accepted_tokens_total = 0
        self.num_steps_turned_down_total = 0  # steps with candidates where the load rule said no

    @classmethod
    def from_engine_config(cls, config: EngineConfig, runner: ModelRunner, tokenizer, max_model_len: int,
                           eos_token_ids: Iterable[int]) -> Speculator:
        """The proposer `config.speculative_method` names, with the engine's policy settings."""
        if config.speculative_method == "ngram":
            from serve.spec_decode.ngram import NgramProposer

            proposer = NgramProposer(min_ngram=config.speculative_ngram_min, max_ngram=config.speculative_ngram_max)
        else:
            from serve.spec_decode.draft_model import DraftModelProposer, check_same_vocabulary

            check_same_vocabulary(tokenizer, runner.vocab_size, config.draft_model)
            # As many tokens as the target's pool (the draft never holds more of a sequence than the
            # target does) plus room for the drafts in flight of every speculating sequence.
            max_num_spec_seqs = min(config.max_num_seqs, config.speculative_max_num_seqs or 32)
            num_blocks = runner.num_blocks + max_num_spec_seqs * (
                -(-config.num_speculative_tokens // config.block_size) + 1)
            proposer = DraftModelProposer(config.draft_model, device=runner.device, dtype=runner.model.dtype,
                                          block_size=config.block_size, num_blocks=num_blocks,
                                          bf16_weights=config.draft_bf16_weights)
        max_num_seqs = config.speculative_max_num_seqs or (32 if runner.device.type == "cuda" else 8)
        return cls(proposer, num_speculative_tokens=config.num_speculative_tokens, max_num_seqs=max_num_seqs,
                   max_budget_fraction=config.speculative_max_budget_fraction,
                   is_default_on=config.speculative_by_default, max_model_len=max_model_len,
                   eos_token_ids=eos_token_ids)

    def is_enabled_for(self, seq: Sequence) -> bool:
        """SamplingParams.speculative: None -> the engine's default, True / False -> on / off."""
        wanted = seq.request.params.speculative
        return self.is_default_on if wanted is None else wanted

    def is_worth_it(self, scheduler: Scheduler) -> bool:
        """The load rule of the module docstring."""
        if len(scheduler.running) > self.max_num_seqs:
            return False
        limit = self.max_budget_fraction * scheduler.config.max_num_batched_tokens
        work = 0
        for seq in (*scheduler.running, *scheduler.waiting):
            work += seq.num_tokens - seq.num_computed_tokens
            if work > limit:
                return False
        return True

    def propose(self, scheduler: Scheduler) -> dict[str, list[int]]:
        """seq_id -> up to k drafts for this step's decoding sequences (empty when the rule says no)."""
        self._draft_probs.clear()
        candidates = [s for s in scheduler.running
                      if self.is_enabled_for(s) and s.num_output_tokens >= 1
                      and s.num_computed_tokens == s.num_tokens - 1 and self._max_num_drafts(s) > 0]
        if not candidates:
            return {}
        if not self.is_worth_it(scheduler):
            self.num_steps_turned_down_total += 1
            return {}
        proposal = self.proposer.propose(
            [ProposalInput(s.seq_id, s.token_ids, s.request.params, s.generator) for s in candidates],
            self.num_speculative_tokens)
        drafts: dict[str, list[int]] = {}
        for b, seq in enumerate(candidates):
            num_drafts = min(len(proposal.draft_token_ids[b]), self._max_num_drafts(seq))
            if num_drafts:
                drafts[seq.seq_id] = proposal.draft_token_ids[b][:num_drafts]
                if proposal.draft_probs is not None:
                    self._draft_probs[seq.seq_id] = proposal.draft_probs[b, :num_drafts]  # (k, V)
        return drafts

    def verify(self, items: Seq[ScheduledSeq], logits: torch.Tensor) -> list[VerifiedTokens]:
        """logits (sum(1 + item.num_drafts), V): each item's rows, in order -> what each item emits."""
        requests = []
        for item in items:
            seq = item.seq
            params = seq.request.params
            q = self._draft_probs.get(seq.seq_id)
            requests.append(DraftsToVerify(
                params=params,
                prompt_token_ids=seq.token_ids[:seq.num_prompt_tokens] if params.needs_penalties else (),
                output_token_ids=seq.output_token_ids if params.needs_penalties or params.min_tokens else (),
                draft_token_ids=item.draft_token_ids,
                draft_probs=None if q is None else q[:item.num_drafts],  # the scheduler may have cut drafts
                generator=seq.generator))
        verified = verify_drafts(logits, requests, eos_token_ids=self.eos_token_ids)
        self.num_draft_tokens_total += sum(item.num_drafts for item in items)
        self.num_accepted_tokens_total += sum(v.num_accepted for v in verified)
        return verified

    def remove(self, seq_ids: Seq[str]) -> None:
        self.proposer.remove(seq_ids)

    def _max_num_drafts(self, seq: Sequence) -> int:
        """A step emits up to k + 1 tokens: never draft past max_tokens or the context."""
        num_left = min(seq.request.params.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens)
        return min(self.num_speculative_tokens, num_left - 1)
