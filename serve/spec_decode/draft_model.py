"""Draft-model proposer: a small checkpoint sharing the target's tokenizer guesses the next k tokens.

Leviathan et al. 2023 (§2.3) and Chen et al. 2023: a cheaper model M_q runs k times autoregressively,
the target verifies the k guesses in one forward pass. Here M_q is a second `LlamaDecoder` behind its
own `ModelRunner` and its own paged KV cache (a `KVCacheManager` without prefix caching), keyed by
request id, kept *incrementally* in sync with the target's accepted tokens:

  - the proposer remembers, per request, the token ids whose draft KV it has written (slots 0..n-1);
  - on `propose` it keeps the longest common prefix of those and the request's current tokens
    (accepted drafts stay, rejected ones and everything after are rolled back with `kv.truncate`),
    then computes what is missing: usually 1 or 2 tokens (the target's correction/bonus token, and
    the last draft, whose KV it never wrote), the whole prompt on a request's first proposal;
  - one ragged forward pass over every request's missing tokens yields draft 1, then k - 1 batched
    one-token passes yield drafts 2..k; the KV of drafts 1..k-1 is written along the way.
No re-prefill per step, and no coupling to the target's blocks: the two caches never share a slot.

Sampling (the choice documented by the Proposer protocol): greedy requests get the draft's argmax,
verified by exact match against the target's argmax (lossless, rejection.py). Sampled requests get
x ~ q, q = the draft's softmax after the request's temperature / top-k / top-p / min-p (the same
warpers the target uses, so q is as close to p as the draft can be; penalties are left out, which is
still lossless since any q works as long as x is drawn from it) and `draft_probs` reports q, so
acceptance is min(1, p/q) and the resample is from norm(p - q)+ (Leviathan et al. Algorithm 1).
A greedy draft with point-mass q would be lossless too but accepts less: its acceptance is p(argmax q)
instead of sum_x min(p(x), q(x)) (Leviathan et al. Theorem 3.5). All-greedy batches skip q altogether.
A seeded request's drafts come from its own generator, so its run is reproducible as long as the
same steps speculate (see serve/engine/speculator.py for when the engine turns speculation down).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lifecycle.errors import ConfigError
from serve.kv_cache.manager import KVCacheManager
from serve.spec_decode.proposer import DraftProposal, ProposalInput, RequestId
from serve.types import SamplingParams
from serve.worker import sampler as sampling
from serve.worker.model_runner import ModelRunner

_GREEDY = SamplingParams(temperature=0.0)


def check_same_vocabulary(target_tokenizer, target_vocab_size: int, draft_path: str | Path) -> None:
    """Speculative decoding compares token ids, so the draft must use the target's tokenizer: the same
    token -> id map (not just the same size: two BPEs of one size disagree on most ids) and the same
    number of logits. Raises ConfigError naming `draft_model`."""
    import json

    from lifecycle.checkpoint import load_checkpoint

    draft = load_checkpoint(draft_path)
    target_vocab, draft_vocab = target_tokenizer.get_vocab(), draft.load_tokenizer().get_vocab()
    if draft_vocab != target_vocab:
        differing = sorted((t for t in draft_vocab.keys() | target_vocab.keys()
                            if draft_vocab.get(t) != target_vocab.get(t)),
                           key=lambda t: (target_vocab.get(t, len(target_vocab)), t))
        examples = ", ".join(f"{t!r} is {draft_vocab.get(t)} in the draft, {target_vocab.get(t)} in the target"
                             for t in differing[:3])
        raise ConfigError(f"draft_model: {draft_path} has a different tokenizer vocabulary from the target "
                          f"({len(draft_vocab)} vs {len(target_vocab)} tokens, {len(differing)} with another id "
                          f"or missing: {examples}); speculative decoding needs a draft trained with the "
                          f"target's tokenizer")
    draft_vocab_size = json.loads((Path(draft_path) / "config.json").read_text())["vocab_size"]
    if draft_vocab_size != target_vocab_size:
        raise ConfigError(f"draft_model: {draft_path} has vocab_size {draft_vocab_size} in config.json, the "
                          f"target {target_vocab_size}; the draft's logits must cover the same token ids")


def _common_prefix_length(a: list[int], b: list[int], known: int) -> int:
    """Length of the common prefix of a and b; `known` is a length that usually matches (the request's
    tokens at the previous proposal), checked at C speed so the Python loop only walks the drafts."""
    n = min(len(a), len(b))
    start = known if known <= n and a[:known] == b[:known] else 0
    for i in range(start, n):
        if a[i] != b[i]:
            return i
    return n


class DraftModelProposer:
    """`Proposer` backed by a draft checkpoint; see the module docstring. `remove` frees a request's KV."""

    def __init__(self, model_path: str | Path, *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, block_size: int = 16, num_blocks: int,
                 bf16_weights: bool = False) -> None:
        self.runner = ModelRunner(model_path, device=device, dtype=dtype, block_size=block_size,
                                  num_blocks=num_blocks)
        # bf16 copies for the passes of few rows where the CPU kernels run them (LlamaDecoder says if it took)
        self.bf16_weights = bf16_weights and self.runner.model.compact_few_row_weights()
        self.kv = KVCacheManager(self.runner.num_blocks, block_size, enable_prefix_caching=False)
        self._cached_token_ids: dict[RequestId, list[int]] = {}  # token ids whose draft KV is written
        self._num_committed: dict[RequestId, int] = {}  # len(token_ids) at the request's last proposal

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    @property
    def num_requests(self) -> int:
        """Requests holding draft KV (tests check it returns to 0)."""
        return len(self._cached_token_ids)

    def propose(self, inputs: Sequence[ProposalInput], num_tokens: int) -> DraftProposal:
        """`num_tokens` drafts for every request whose draft KV fits, none for the others."""
        drafts: list[list[int]] = [[] for _ in inputs]
        if num_tokens <= 0 or not inputs:
            return DraftProposal(drafts)
        active, chunks = self._reconcile(inputs, num_tokens)
        if not active:
            return DraftProposal(drafts)
        tables = [self.kv.block_table(inputs[b].request_id) for b in active]
        params = [inputs[b].params or _GREEDY for b in active]
        generators = [inputs[b].generator for b in active]
        is_sampled = not all(p.is_greedy for p in params)
        meta = None
        if is_sampled:  # the warpers only; the token ids feed penalties, which q leaves out
            meta = sampling.SamplingMetadata.from_params(
                params, vocab_size=self.vocab_size, device=self.runner.device, prompt_token_ids=[()] * len(params),
                output_token_ids=[()] * len(params), generators=generators)
        q_steps: list[torch.Tensor] = []
        for _ in range(num_tokens):
            hidden, attn = self.runner.forward(chunks, tables)  # (num_tokens_this_pass, hidden)
            last_rows = [start + length - 1 for start, length in zip(attn.query_starts, attn.query_lens)]
            logits = self.runner.model.logits(hidden[last_rows])  # (A, V)
            token_ids = logits.argmax(dim=-1)  # (A,) greedy rows' drafts
            if meta is not None:
                q = sampling.sampling_probs(logits, meta)  # (A, V)
                token_ids = torch.where(meta.is_greedy, token_ids, sampling.sample(q, meta.generators))  # (A,)
                q_steps.append(q)
            new_ids = token_ids.tolist()
            for i, b in enumerate(active):
                drafts[b].append(new_ids[i])
            # the next pass feeds each draft back in, at the position after the chunk just computed
            chunks = [([new_ids[i]], start + len(ids)) for i, (ids, start) in enumerate(chunks)]
        for b in active:  # slots hold tokens + drafts[:-1]: the last draft's KV was never computed
            self._cached_token_ids[inputs[b].request_id].extend(drafts[b][:-1])
        draft_probs = None
        if q_steps:
            q_all = torch.stack(q_steps, dim=1)  # (A, K, V)
            draft_probs = q_all.new_zeros(len(inputs), num_tokens, self.vocab_size)  # (B, K, V)
            draft_probs[torch.tensor(active, device=q_all.device)] = q_all
        return DraftProposal(drafts, draft_probs)

    def remove(self, request_ids: Sequence[RequestId]) -> None:
        for request_id in request_ids:
            self._num_committed.pop(request_id, None)
            if self._cached_token_ids.pop(request_id, None) is not None:
                self.kv.free(request_id)

    def _reconcile(self, inputs: Sequence[ProposalInput], num_tokens: int,
                   ) -> tuple[list[int], list[tuple[list[int], int]]]:
        """Roll each request's draft KV back to what still matches its tokens and allocate the slots this
        proposal writes. Returns the indices of requests that get drafts and their (missing ids, start)."""
        active: list[int] = []
        chunks: list[tuple[list[int], int]] = []
        for b, item in enumerate(inputs):
            tokens = list(item.token_ids)
            rid = item.request_id
            cached = self._cached_token_ids.get(rid)
            # Drafts sit at positions len .. len + k - 2 of the draft's KV, plus the last one's logits.
            if len(tokens) + num_tokens - 1 > self.runner.max_model_len:
                self.remove([rid])
                continue
            # Keep at least the last token to compute: its logits give draft 1.
            num_kept = 0 if cached is None else min(
                _common_prefix_length(cached, tokens, self._num_committed[rid]), len(tokens) - 1)
            if cached is not None:
                self.kv.truncate(rid, num_kept)
            # New slots: the missing tokens, then drafts 1..k-1 fed back in.
            if self.kv.allocate_slots(rid, len(tokens) - num_kept + num_tokens - 1) is None:
                self.remove([rid])  # draft pool full: no drafts for it now; it re-prefills later
                continue
            self._cached_token_ids[rid] = tokens
            self._num_committed[rid] = len(tokens)
            active.append(b)
            chunks.append((tokens[num_kept:], num_kept))
        return active, chunks
