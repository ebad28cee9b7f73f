"""LLMEngine: add_request / step / abort over the scheduler, the KV cache and the model runner.

Call order: `add_request()` any time (validated at admission: a bad request raises
`InvalidRequestError` naming the field and never disturbs the others); `step()` runs one scheduling
decision + one forward pass and returns the streamed deltas (`RequestOutput`) of every request that
produced something; `abort_request()` frees a request's blocks at once. `generate()` drives step()
until the given prompts finish (offline use, tests, benchmarks). Single-threaded: the async engine
(for the servers) runs step() in one background thread and feeds it through a queue.

Speculative decoding (`speculative_method`): each step, before scheduling, the `Speculator` asks the
proposer for drafts of the decoding sequences; the scheduler computes them after each one's last
token; the runner returns the target's logits at those 1 + k positions; the speculator verifies them
(lossless rejection sampling) and the emitted tokens go through the normal append path one by one, so
a stop token, stop string or max_tokens in the middle ends the sequence there and the rest is dropped.
The scheduler rolls back the rejected drafts' KV before the prefix cache can see them.

Parallel sampling (`n > 1`, serve/engine/parallel_sampling.py): completion 0 computes the prompt; the
others draw their first token from its last prompt row and fork its KV blocks (full blocks shared and
ref-counted, the partial last block copied), then run as ordinary sequences.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from serve.engine.detokenizer import IncrementalDetokenizer
from serve.engine.outputs import concat_completions, empty_output, merge_outputs
from serve.engine.parallel_sampling import PromptSharing
from serve.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from serve.engine.sequence import Sequence, SequenceStatus
from serve.engine.speculator import Speculator
from serve.kv_cache.manager import KVCacheManager
from serve.types import (CompletionOutput, EngineStats, FinishedRequestStats, FinishReason, InvalidRequestError,
                         Logprobs, Request, RequestOutput, SamplingParams)
from serve.worker import sampler as sampling
from serve.worker.model_runner import ModelRunner, ModelRunnerOutput


@dataclass(frozen=True)
class EngineConfig:
    model: str
    device: str | None = None  # None/"auto": CUDA if available, else CPU
    dtype: str | None = None  # "float32", "bfloat16", "float16"; default fp32 on CPU, bf16 on CUDA
    block_size: int = 16
    use_cpu_kernels: bool = True  # fp32 on CPU: lmforge's C kernels (serve/worker/kernels); False: torch ops only
    # With the CPU kernels: oneDNN-packed copies of the fp32 projections and LM head for steps of 9-256 rows
    # (batched decode, ~1.09x W1 throughput); they hold a second copy of those weights in memory.
    cpu_packed_weights: bool = True
    # 4-bit checkpoints on the CPU kernels: GEMVs of one row (single-stream decode) on activations rounded to int8
    # per 32 columns ("int8", as onnxruntime-genai's int4 and llama.cpp; bounded logprob error, ~1.2x decode) or
    # exact fp32 math on the dequantized weights ("fp32"). None: LMFORGE_Q4_ACTIVATIONS, else "int8".
    q4_activations: Literal["int8", "fp32"] | None = None
    kv_cache_memory_bytes: int | None = None  # default 1 GiB
    num_kv_blocks: int | None = None  # overrides the memory budget (tests use it to force preemption)
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    # Speculative decoding (serve/engine/speculator.py): "ngram" (prompt lookup) or "draft" (draft_model).
    speculative_method: Literal["ngram", "draft"] | None = None
    num_speculative_tokens: int = 4  # k: drafts verified per sequence and step
    draft_model: str | None = None  # checkpoint sharing the target's tokenizer, for "draft"
    # The draft's passes of few rows stream bf16 copies of its weights (CPU kernels only: half the bytes). Drafts
    # are proposals the target verifies, so outputs are unchanged; only which tokens get proposed can move.
    draft_bf16_weights: bool = True
    speculative_ngram_min: int = 2
    speculative_ngram_max: int = 4
    speculative_max_num_seqs: int | None = None  # no drafts above this many running; None: 8 CPU, 32 CUDA
    speculative_max_budget_fraction: float = 0.5  # no drafts when real work exceeds this share of the budget
    speculative_by_default: bool = True  # for requests with SamplingParams.speculative=None

    def __post_init__(self) -> None:
        from lifecycle.errors import ConfigError

        if self.speculative_method not in (None, "ngram", "draft"):
            raise ConfigError(f"speculative_method: must be 'ngram', 'draft' or None, got {self.speculative_method!r}")
        if self.speculative_method == "draft" and not self.draft_model:
            raise ConfigError("draft_model: speculative_method='draft' needs a draft checkpoint path")
        if self.draft_model and self.speculative_method != "draft":
            raise ConfigError(f"draft_model: is set but speculative_method is {self.speculative_method!r}; "
                              "set speculative_method='draft' to use it")
        if self.q4_activations not in (None, "int8", "fp32"):
            raise ConfigError(f"q4_activations: must be 'int8', 'fp32' or None, got {self.q4_activations!r}")
        if self.num_speculative_tokens < 1:
            raise ConfigError(f"num_speculative_tokens: must be >= 1, got {self.num_speculative_tokens}")
        if not 1 <= self.speculative_ngram_min <= self.speculative_ngram_max:
            raise ConfigError(f"speculative_ngram_min/max: need 1 <= min <= max, got "
                              f"{self.speculative_ngram_min}, {self.speculative_ngram_max}")
        if self.speculative_max_num_seqs is not None and self.speculative_max_num_seqs < 1:
            raise ConfigError(f"speculative_max_num_seqs: must be >= 1 or None, got {self.speculative_max_num_seqs}")
        if not 0.0 < self.speculative_max_budget_fraction <= 1.0:
            raise ConfigError(f"speculative_max_budget_fraction: must be in (0, 1], "
                              f"got {self.speculative_max_budget_fraction}")


Token = tuple[int, Logprobs | None]  # a sampled token id and its logprobs (None when not asked)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        from lifecycle.checkpoint import load_checkpoint

        self.config = config
        self.checkpoint = load_checkpoint(config.model)
        self.tokenizer = self.checkpoint.load_tokenizer()
        dtype = _DTYPES[config.dtype] if config.dtype else None
        self.runner = ModelRunner(Path(config.model), device=config.device, dtype=dtype, block_size=config.block_size,
                                  kv_cache_memory_bytes=config.kv_cache_memory_bytes, num_blocks=config.num_kv_blocks,
                                  use_cpu_kernels=config.use_cpu_kernels,
                                  packed_weights=config.cpu_packed_weights, q4_activations=config.q4_activations)
        self.kv = KVCacheManager(self.runner.num_blocks, config.block_size,
                                 enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            enable_chunked_prefill=config.enable_chunked_prefill,
            enable_prefix_caching=config.enable_prefix_caching), self.kv)
        self.eos_token_ids = _eos_ids(self.checkpoint.path, self.tokenizer)
        # A sequence must fit in the KV pool on its own, or preemption could never make room for it
        # (it would preempt itself forever): the context the engine admits is the smaller of the two.
        self.max_model_len = min(self.runner.max_model_len, self.runner.num_blocks * config.block_size)
        self.speculator = (Speculator.from_engine_config(config, self.runner, self.tokenizer, self.max_model_len,
                                                         self.eos_token_ids) if config.speculative_method else None)
        self.prompt_sharing = PromptSharing(self.scheduler, self.kv, self.runner.copy_block)
        self._seqs: dict[str, list[Sequence]] = {}  # request_id -> its n sequences
        self._sent_prompt_logprobs: set[str] = set()
        self._finished_stats: list[FinishedRequestStats] = []
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0

    # --------------------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt: str | Seq[int], params: SamplingParams | None = None, *,
                    priority: int = 0, arrival_time_s: float | None = None) -> Request:
        if request_id in self._seqs:
            raise InvalidRequestError("request_id", f"{request_id!r} is already running")
        if params is None:
            params = SamplingParams()
        elif not isinstance(params, SamplingParams):
            raise InvalidRequestError("params", f"must be a SamplingParams, got {type(params).__name__}: build it "
                                                f"with SamplingParams(**fields), which checks every field")
        if params.speculative and self.speculator is None:
            # Forcing speculation on where there is no speculator would silently run without it; refused,
            # as the vLLM and onnxruntime backends do (same field, same status through the API).
            raise InvalidRequestError("speculative", "is true but this engine runs no speculative decoding (start "
                                                     "it with --draft-model or --ngram); send null or false")
        if isinstance(prompt, str):
            prompt_text, prompt_ids = prompt, self.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            prompt_text, prompt_ids = None, list(prompt)
        request = Request(request_id=request_id, prompt_token_ids=tuple(prompt_ids), params=params,
                          arrival_time_s=time.monotonic() if arrival_time_s is None else arrival_time_s,
                          priority=priority, prompt_text=prompt_text)
        request = request.validated_for(self.runner.vocab_size, self.max_model_len)
        params = request.params  # clipped to the context left
        seqs = []
        for index in range(params.n):
            # n > 1: each completion is its own sequence; completion 0 computes the prompt and the others
            # fork its KV blocks (PromptSharing).
            seq = Sequence(seq_id=f"{request_id}#{index}", request=request, index=index,
                           token_ids=list(request.prompt_token_ids), num_prompt_tokens=request.num_prompt_tokens)
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids,
                                                     skip_special_tokens=params.skip_special_tokens,
                                                     stop=params.stop, min_tokens=params.min_tokens,
                                                     include_stop_str_in_output=params.include_stop_str_in_output)
            if params.seed is not None:
                # n > 1 with a seed: completion i draws from seed + i (as vLLM), not n identical copies.
                seq.generator = sampling.make_generator(params.seed_for_completion(index), self.runner.device)
            seqs.append(seq)
        self.prompt_sharing.add(seqs)
        self._seqs[request_id] = seqs
        return request

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks; False if it is unknown or already finished."""
        return self.finish_request(request_id, FinishReason.ABORT) is not None

    def finish_request(self, request_id: str, reason: FinishReason) -> RequestOutput | None:
        """End a request from outside the step loop (ABORT: the client went away; ERROR: a step failed under
        it) and free its KV blocks now. Returns its last delta, finished with `reason` on every completion
        still running, for whoever streams it; None if the request is unknown or already finished."""
        seqs = self._seqs.get(request_id)
        if seqs is None:
            return None
        self.prompt_sharing.discard(seqs[0])
        deltas = {}
        for seq in seqs:
            if not seq.is_finished:
                self._finish(seq, reason)
                deltas[seq.index] = CompletionOutput(index=seq.index, finish_reason=reason)
        out = self._request_output(request_id, deltas)  # forgets the request: every completion has finished
        self._seqs.pop(request_id, None)
        return out

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def unfinished_request_ids(self) -> list[str]:
        return list(self._seqs)

    # ------------------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        drafts = self.speculator.propose(self.scheduler) if self.speculator is not None else None
        sched = self.scheduler.schedule(drafts)
        if self.speculator is not None and sched.preempted:
            self.speculator.remove([seq.seq_id for seq in sched.preempted])
        if sched.is_empty:
            return []
        wants_prompt = [item.seq.request.params.prompt_logprobs is not None
                        and item.seq.num_computed_tokens < item.seq.num_prompt_tokens for item in sched.scheduled]
        tables = [self.kv.block_table(item.seq.seq_id) for item in sched.scheduled]
        out = self.runner.execute(sched, tables, wants_prompt)
        for i, logits in out.prompt_logits.items():
            self._collect_prompt_logprobs(sched.scheduled[i], logits)
        emitted, first_tokens = self._sample_and_verify(sched, out)
        now = time.monotonic()
        touched: dict[str, dict[int, CompletionOutput]] = {}
        for i, item in enumerate(sched.scheduled):  # before appending: drafts' KV rolls back to the accepted
            self.scheduler.on_step_done(item, emitted[i][1] if item.num_drafts else 0)
        for i in first_tokens:  # n > 1: before the parent's token, whose finish would free the prompt's blocks
            self.prompt_sharing.fork(sched.scheduled[i].seq)
        for i, (tokens, _) in emitted.items():
            seq = sched.scheduled[i].seq  # it computed its last token: these are new (also after recompute)
            touched.setdefault(seq.request.request_id, {})[seq.index] = self._append_tokens(seq, tokens, now)
            for sibling, token in first_tokens.get(i, ()):
                touched[seq.request.request_id][sibling.index] = self._append_tokens(sibling, [token], now)
        for item in sched.scheduled:  # prompt logprobs of long prompts arrive before any token
            seq = item.seq
            if seq.request.params.prompt_logprobs is not None and seq.request.request_id not in touched \
                    and seq.num_computed_tokens >= seq.num_prompt_tokens:
                touched.setdefault(seq.request.request_id, {})
        return [self._request_output(rid, deltas) for rid, deltas in touched.items()]

    def generate(self, prompts: Seq[str | Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Run the prompts to completion; returns one aggregated RequestOutput per prompt, in order."""
        params_list = list(params) if isinstance(params, list | tuple) else [params] * len(prompts)
        ids = [f"generate-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, params_list):
            self.add_request(rid, prompt, p)
        merged: dict[str, list[RequestOutput]] = {rid: [] for rid in ids}
        while any(not (merged[rid] and merged[rid][-1].finished) for rid in ids):
            if not self.has_unfinished_requests():  # aborted from elsewhere: nothing more will come
                break
            for ro in self.step():
                if ro.request_id in merged:
                    merged[ro.request_id].append(ro)
        return [merge_outputs(merged[rid]) if merged[rid] else empty_output(rid) for rid in ids]

    def stats(self) -> EngineStats:
        """A snapshot for metrics. It hands over (and forgets) the requests finished since the last call, so
        one consumer owns it: AsyncEngine calls it after every step and passes each snapshot to `on_stats`."""
        finished, self._finished_stats = self._finished_stats, []
        pc, spec = self.kv.prefix_cache_stats, self.speculator
        return EngineStats(num_running=len(self.scheduler.running),
                           num_waiting=len(self.scheduler.waiting) + self.prompt_sharing.num_waiting,
                           kv_cache_usage=self.kv.usage, num_preemptions_total=self.scheduler.num_preemptions_total,
                           num_prompt_tokens_total=self.num_prompt_tokens_total,
                           num_generation_tokens_total=self.num_generation_tokens_total,
                           prefix_cache_queries_tokens=pc.num_queried_tokens, prefix_cache_hits_tokens=pc.num_hit_tokens,
                           spec_draft_tokens_total=spec.num_draft_tokens_total if spec is not None else 0,
                           spec_accepted_tokens_total=spec.num_accepted_tokens_total if spec is not None else 0,
                           finished_requests=finished)

    # ---------------------------------------------------------------------------- helpers
    def _sample_and_verify(self, sched: SchedulerOutput, out: ModelRunnerOutput,
                           ) -> tuple[dict[int, tuple[list[Token], int]], dict[int, list[tuple[Sequence, Token]]]]:
        """item index -> (tokens to append with their logprobs, accepted drafts), and item index -> the
        first token of each n > 1 sibling sampled from that item's row. Items that computed their last
        token without drafts sample one token; items with drafts go through verification."""
        plain_items, plain_rows, spec_items, spec_rows = [], [], [], []
        row = 0
        for i, num_rows in zip(out.sample_indices, out.num_sample_rows or [1] * len(out.sample_indices)):
            if sched.scheduled[i].num_drafts:
                spec_items.append(i)
                spec_rows.extend(range(row, row + num_rows))
            else:
                plain_items.append(i)
                plain_rows.append(row)
            row += num_rows
        logits = out.sample_logits  # (rows, V)
        # n > 1: a parent that completed its prompt lends its row to its waiting siblings' first tokens.
        seqs = [sched.scheduled[i].seq for i in plain_items]
        siblings = [(i, row, sibling) for i, row in zip(plain_items, plain_rows)
                    for sibling in self.prompt_sharing.first_token_siblings(sched.scheduled[i])]
        rows = plain_rows + [row for _, row, _ in siblings]
        seqs += [sibling for _, _, sibling in siblings]
        plain = logits if rows == list(range(logits.shape[0])) else logits[rows]  # (num_plain + num_siblings, V)
        tokens = self._sample(seqs, plain)
        emitted = {i: ([token], 0) for i, token in zip(plain_items, tokens)}
        first_tokens: dict[int, list[tuple[Sequence, Token]]] = {}
        for (i, _, sibling), token in zip(siblings, tokens[len(plain_items):]):
            first_tokens.setdefault(i, []).append((sibling, token))
        if spec_items:
            verified = self.speculator.verify([sched.scheduled[i] for i in spec_items], logits[spec_rows])
            for i, v in zip(spec_items, verified):
                emitted[i] = (list(zip(v.token_ids, v.logprobs or [None] * len(v.token_ids))), v.num_accepted)
        return dict(sorted(emitted.items())), first_tokens  # scheduling order, as without speculation

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Token]:
        """One token (and its logprobs, if asked) per sequence; logits (len(seqs), V), row j for seqs[j]."""
        if not seqs:
            return []
        meta = sampling.SamplingMetadata.from_params(
            [s.request.params for s in seqs], vocab_size=self.runner.vocab_size, device=logits.device,
            # Prompt ids only feed penalties; output ids also decide the min_tokens mask.
            prompt_token_ids=[s.token_ids[:s.num_prompt_tokens] if s.request.params.needs_penalties else ()
                              for s in seqs],
            output_token_ids=[s.output_token_ids for s in seqs],
            eos_token_ids=sorted(self.eos_token_ids),
            generators=[s.generator for s in seqs])
        out = sampling.sample_batch(logits, meta)
        token_ids = out.token_ids.tolist()
        logprobs: list[Logprobs | None] = [None] * len(seqs)
        if out.logprobs is not None:
            wanted = [s.request.params.logprobs or 0 for s in seqs]
            logprobs = [lp if s.request.params.logprobs is not None else None
                        for s, lp in zip(seqs, out.logprobs.to_logprobs(out.token_ids, wanted))]
        return list(zip(token_ids, logprobs))

    def _collect_prompt_logprobs(self, item, logits: torch.Tensor) -> None:
        """Row r of `logits` sits at position start + r and scores the prompt token at start + r + 1."""
        seq = item.seq
        start = seq.num_computed_tokens
        targets = seq.token_ids[start + 1:start + 1 + logits.shape[0]]
        targets = targets[:max(0, seq.num_prompt_tokens - start - 1)]
        # Entries 0..start exist before this chunk's: the first token has no logprob, and a prefix served from
        # the cache (prompt_logprobs_start) has none either; after a recompute, later entries are redone.
        if seq.prompt_logprobs is None or len(seq.prompt_logprobs) != start + 1:  # else: the previous chunk's end
            known = (seq.prompt_logprobs or [])[:start + 1]
            seq.prompt_logprobs = known + [None] * (start + 1 - len(known))
        if targets:
            num_top = seq.request.params.prompt_logprobs or 0
            target_ids = torch.tensor(targets, device=logits.device)
            lp = sampling.compute_logprobs(logits[:len(targets)], target_ids, max(num_top, 1))
            seq.prompt_logprobs.extend(lp.to_logprobs(target_ids, [num_top] * len(targets)))

    def _append_tokens(self, seq: Sequence, tokens: list[Token], now: float,
                       ) -> CompletionOutput:
        """Append one step's tokens in order; a finish (stop token or string, max_tokens, context) in the
        middle ends the sequence there and the tokens after it are dropped."""
        deltas = []
        for token_id, logprobs in tokens:
            deltas.append(self._append(seq, token_id, logprobs, now))
            if seq.is_finished:
                break
        return deltas[0] if len(deltas) == 1 else concat_completions(deltas)

    def _append(self, seq: Sequence, token_id: int, logprobs: Logprobs | None, now: float) -> CompletionOutput:
        seq.token_ids.append(token_id)
        self.num_generation_tokens_total += 1
        if seq.first_token_s is None:
            seq.first_token_s = now
            if seq.index == 0:  # once per request: with n > 1 the prompt is computed once (vLLM counts so too)
                self.num_prompt_tokens_total += seq.num_prompt_tokens
        else:
            seq.inter_token_s.append(now - seq.last_token_s)
        seq.last_token_s = now
        params = seq.request.params
        text = seq.detokenizer.update([token_id])
        reason: FinishReason | None = None
        stop_reason: str | int | None = None
        if seq.detokenizer.stopped:
            reason, stop_reason = FinishReason.STOP_STRING, seq.detokenizer.stop_string_hit
        elif seq.num_output_tokens > params.min_tokens and (  # the sampler masks the first min_tokens too
                token_id in params.stop_token_ids or (not params.ignore_eos and token_id in self.eos_token_ids)):
            reason, stop_reason = FinishReason.STOP, token_id
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            if reason is not FinishReason.STOP_STRING:
                text += seq.detokenizer.finish()
            seq.stop_reason = stop_reason
            self._finish(seq, reason)
        return CompletionOutput(index=seq.index, token_ids=(token_id,), text=text,
                                logprobs=(logprobs,) if logprobs is not None else None,
                                finish_reason=reason, stop_reason=stop_reason)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finish_reason = reason
        seq.status = SequenceStatus.FINISHED
        self.scheduler.remove(seq)
        if self.speculator is not None:
            self.speculator.remove([seq.seq_id])
        req = seq.request
        end = time.monotonic()
        self._finished_stats.append(FinishedRequestStats(
            request_id=req.request_id, finish_reason=reason, num_prompt_tokens=seq.num_prompt_tokens,
            num_generation_tokens=seq.num_output_tokens,
            queue_s=None if seq.first_scheduled_s is None else seq.first_scheduled_s - req.arrival_time_s,
            ttft_s=None if seq.first_token_s is None else seq.first_token_s - req.arrival_time_s,
            itl_s=tuple(seq.inter_token_s), e2e_s=end - req.arrival_time_s))

    def _request_output(self, request_id: str, deltas: dict[int, CompletionOutput]) -> RequestOutput:
        seqs = self._seqs[request_id]
        first = seqs[0]
        req = first.request
        finished = all(s.is_finished for s in seqs)
        prompt_logprobs = None
        if req.params.prompt_logprobs is not None and request_id not in self._sent_prompt_logprobs \
                and first.num_computed_tokens >= first.num_prompt_tokens:
            prompt_logprobs = tuple(first.prompt_logprobs)
            self._sent_prompt_logprobs.add(request_id)
        if finished:
            del self._seqs[request_id]
            self._sent_prompt_logprobs.discard(request_id)
        end = time.monotonic() if finished else None
        return RequestOutput(
            request_id=request_id, outputs=tuple(deltas[i] for i in sorted(deltas)), finished=finished,
            num_prompt_tokens=first.num_prompt_tokens, num_cached_tokens=first.num_cached_tokens,
            prompt_logprobs=prompt_logprobs,
            queue_s=None if first.first_scheduled_s is None else first.first_scheduled_s - req.arrival_time_s,
            ttft_s=None if first.first_token_s is None else first.first_token_s - req.arrival_time_s,
            e2e_s=None if end is None else end - req.arrival_time_s)


def _eos_ids(path: Path, tokenizer) -> frozenset[int]:
    """EOS ids from generation_config.json (may list several, e.g. <|endoftext|> and <|im_end|>) and the tokenizer."""
    import json

    ids: set[int] = set()
    gen = path / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
