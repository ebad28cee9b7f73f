"""Scoring: log-likelihoods of given text, computed from prompt logprobs (what evaluation needs).

Two query kinds, as lm-evaluation-harness's `loglikelihood` and `loglikelihood_rolling`:

- log P(continuation | context), with `is_greedy` (every continuation token was the most likely one):
  multiple-choice accuracy;
- log P(text), every token scored in disjoint windows of the context length (perplexity).

Each (context, continuation) pair and each rolling window becomes one engine request for the prompt
`context + continuation` with `prompt_logprobs=0, max_tokens=1`: the engine scores every prompt token
and generates one (discarded) token; `prompt_logprobs_start` lets the context before the scored tokens
come from the prefix cache. `Scorer` needs only a backend's `generate`, so every backend
gets scoring by composition. The pure functions (`encode_pair`, `rolling_windows`) follow
lm-evaluation-harness 0.4 (lm_eval/models/huggingface.py `_encode_pair`, lm_eval/utils.py
`get_rolling_token_windows` + `make_disjoint_window`) so per-item numbers can be compared with it.

Ties: `is_greedy` means rank 1, i.e. no token has a strictly larger logprob; lm-eval compares with
`argmax`, which breaks an exact tie toward the lower id. Float logits practically never tie.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from serve.types import InvalidRequestError, RequestOutput, SamplingParams, TokenLogprob

ScoreText = str | tuple[int, ...]  # text (tokenized by the backend) or token ids
GenerateFn = Callable[..., AsyncIterator[RequestOutput]]  # Backend.generate
MAX_SCORE_PROMPTS = 4096  # engine requests one Score call may create (pairs + rolling windows)

# Scoring runs no sampler: greedy, one generated token, no speculation (nothing to speed up).
_SCORE_PARAMS = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, speculative=False)


@dataclass(frozen=True)
class LoglikelihoodQuery:
    context: ScoreText
    continuations: tuple[ScoreText, ...]


@dataclass(frozen=True)
class TokenScores:
    """Scored tokens, in order: `tokens[i].logprob` is log P(token i | everything before it)."""

    tokens: tuple[TokenLogprob, ...]
    num_windows: int = 1

    @property
    def logprob(self) -> float:
        return sum(t.logprob for t in self.tokens)

    @property
    def is_greedy(self) -> bool:
        return all(t.rank == 1 for t in self.tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class ScoreResult:
    loglikelihood: tuple[tuple[TokenScores, ...], ...]  # [query][continuation]
    rolling: tuple[TokenScores, ...]


# -- pure functions ---------------------------------------------------------------------------------


def encode_pair(encode: Callable[[str], list[int]], context: ScoreText, continuation: ScoreText,
                ) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation). Two texts as lm-eval's `_encode_pair`: trailing spaces of
    the context move to the continuation (" Paris" is one token, "Paris" after a space is not), the
    pair is tokenized as one string and the continuation is what follows the context's own tokens.
    Token ids are taken as given; a text beside ids is tokenized on its own."""
    if isinstance(context, str) and isinstance(continuation, str):
        num_spaces = len(context) - len(context.rstrip())
        if num_spaces:
            context, continuation = context[:-num_spaces], context[-num_spaces:] + continuation
        context_ids = encode(context) if context else []
        return context_ids, encode(context + continuation)[len(context_ids):]
    as_ids = [list(part) if not isinstance(part, str) else encode(part) if part else []
              for part in (context, continuation)]
    return as_ids[0], as_ids[1]


def rolling_windows(token_ids: Sequence[int], prefix_token_id: int, max_seq_len: int,
                    ) -> list[tuple[list[int], list[int]]]:
    """Disjoint (context, continuation) windows that score every token of `token_ids` exactly once.

    lm-eval's `get_rolling_token_windows(context_len=1)` + `make_disjoint_window`: the first window
    scores tokens[:L] after `prefix_token_id`; each later one scores the next up to L tokens with the
    tokens just before them as context. A window's context + continuation is L + 1 tokens at most
    (the model reads L of them; the last is only predicted).
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    tokens = list(token_ids)
    if not tokens:
        return []
    first = min(max_seq_len, len(tokens))
    windows = [([prefix_token_id], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        end = min(predicted + max_seq_len, len(tokens))
        windows.append((tokens[end - max_seq_len - 1:predicted], tokens[predicted:end]))
        predicted = end
    return windows


# -- the scorer -------------------------------------------------------------------------------------


@dataclass
class _Job:
    path: str  # the query's field path, for errors
    prompt_token_ids: list[int]
    num_scored: int  # the last num_scored prompt tokens are scored


class Scorer:
    """Runs scoring queries as prompt-logprob requests through `generate` (a Backend's), concurrently,
    so the engine batches them. Every query is checked (and refused naming its field) before any runs."""

    def __init__(self, generate: GenerateFn, encode: Callable[[str], list[int]], *, prefix_token_id: int,
                 vocab_size: int, max_model_len: int, max_prompts: int = MAX_SCORE_PROMPTS) -> None:
        if max_model_len < 3:
            raise ValueError(f"scoring needs a context of >= 3 tokens, got {max_model_len}")
        self._generate, self._encode = generate, encode
        self.prefix_token_id, self.vocab_size, self.max_model_len = prefix_token_id, vocab_size, max_model_len
        self.max_prompts = max_prompts
        # The engine admits prompts of < max_model_len tokens (it must generate one).
        self.max_prompt_tokens = max_model_len - 1

    async def score(self, request_id: str, loglikelihood: Sequence[LoglikelihoodQuery],
                    rolling: Sequence[ScoreText], *, priority: int = 0) -> ScoreResult:
        jobs, shape = self._plan(loglikelihood, rolling)
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._run(f"{request_id}/{n}", job, priority))
                         for n, job in enumerate(jobs)]
        except BaseExceptionGroup as failed:  # the group cancelled the others; report the first cause
            raise failed.exceptions[0] from None
        scores = iter(task.result() for task in tasks)
        ll = tuple(tuple(TokenScores(next(scores)) for _ in range(num)) for num in shape["loglikelihood"])
        rolled = []
        for num_windows in shape["rolling"]:
            tokens = tuple(t for _ in range(num_windows) for t in next(scores))
            rolled.append(TokenScores(tokens, num_windows=num_windows))
        return ScoreResult(loglikelihood=ll, rolling=tuple(rolled))

    def _plan(self, loglikelihood: Sequence[LoglikelihoodQuery], rolling: Sequence[ScoreText],
              ) -> tuple[list[_Job], dict[str, list[int]]]:
        jobs: list[_Job] = []
        shape: dict[str, list[int]] = {"loglikelihood": [], "rolling": []}
        if not loglikelihood and not rolling:
            raise InvalidRequestError("loglikelihood", "nothing to score: give loglikelihood or rolling queries")
        for i, query in enumerate(loglikelihood):
            if not query.continuations:
                raise InvalidRequestError(f"loglikelihood[{i}].continuations", "is empty: give at least one")
            self._check_ids(query.context, f"loglikelihood[{i}].context")
            for j, continuation in enumerate(query.continuations):
                path = f"loglikelihood[{i}].continuations[{j}]"
                self._check_ids(continuation, path)
                context_ids, continuation_ids = encode_pair(self._encode, query.context, continuation)
                if not continuation_ids:
                    raise InvalidRequestError(path, "has no tokens: give a non-empty continuation")
                room = self.max_prompt_tokens - len(continuation_ids)
                if room < 1:
                    raise InvalidRequestError(path, f"has {len(continuation_ids)} tokens; at most "
                                                    f"{self.max_prompt_tokens - 1} fit the served context of "
                                                    f"{self.max_model_len}: score long text with `rolling`")
                # lm-eval truncates on the left too: the context's start is what a long pair loses.
                context_ids = (context_ids or [self.prefix_token_id])[-room:]
                self._add(jobs, [_Job(path, context_ids + continuation_ids, len(continuation_ids))])
            shape["loglikelihood"].append(len(query.continuations))
        for k, text in enumerate(rolling):
            path = f"rolling[{k}].text"
            self._check_ids(text, path)
            token_ids = list(text) if not isinstance(text, str) else self._encode(text) if text else []
            if not token_ids:
                raise InvalidRequestError(path, "has no tokens: give a non-empty text")
            # context + continuation <= L + 1 <= max_prompt_tokens
            windows = rolling_windows(token_ids, self.prefix_token_id, self.max_prompt_tokens - 1)
            self._add(jobs, [_Job(path, context + continuation, len(continuation)) for context, continuation in windows])
            shape["rolling"].append(len(windows))
        return jobs, shape

    def _add(self, jobs: list[_Job], new: list[_Job]) -> None:
        jobs.extend(new)
        if len(jobs) > self.max_prompts:
            raise InvalidRequestError(new[0].path, f"the call needs more than {self.max_prompts} engine requests "
                                                   "(one per continuation and per context window of a rolling "
                                                   "text): split it")

    def _check_ids(self, text: ScoreText, path: str) -> None:
        if isinstance(text, str):
            return
        bad = sorted({t for t in text if not 0 <= t < self.vocab_size})
        if bad:
            raise InvalidRequestError(path, f"token ids {bad[:8]} are not in the vocabulary (0 <= id < {self.vocab_size})")

    async def _run(self, request_id: str, job: _Job, priority: int) -> tuple[TokenLogprob, ...]:
        prompt_logprobs = None
        # Only the scored tokens need logprobs: the context before them may come from the prefix cache, so the
        # choices of one multiple-choice question compute their shared context once.
        params = dataclasses.replace(_SCORE_PARAMS,
                                     prompt_logprobs_start=len(job.prompt_token_ids) - job.num_scored)
        stream = self._generate(request_id, job.prompt_token_ids, params, priority=priority)
        async with contextlib.aclosing(stream):
            try:
                async for out in stream:
                    if out.prompt_logprobs is not None:
                        prompt_logprobs = out.prompt_logprobs
            except InvalidRequestError as err:  # the engine refused it: say which query
                raise InvalidRequestError(job.path, str(err)) from None
        if prompt_logprobs is None or len(prompt_logprobs) != len(job.prompt_token_ids):
            raise RuntimeError(f"{request_id}: the backend returned no prompt logprobs for {job.path}")
        return tuple(position.chosen for position in prompt_logprobs[-job.num_scored:])
