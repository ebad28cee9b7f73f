"""The serving engine's boundary types: what a client hands in and what the engine streams out.

    SamplingParams   how one request is sampled and when it stops; validated when built
    Request          the immutable input (the scheduler wraps it in its mutable `Sequence`)
    RequestOutput    one streamed delta: per completion new tokens, text, logprobs, finish reason
    EngineStats      what `serve.metrics` turns into Prometheus series

Plain data and validation only (no torch): the API layers, the client and the scheduler's CPU tests
import it without a model. Bad input is rejected twice, both times with `InvalidRequestError` naming
the field: `SamplingParams(...)` checks everything that needs no model, and
`Request.validated_for` / `SamplingParams.validate_against` check what needs the model's vocabulary
and context length, at admission, so a bad request fails alone and the engine keeps serving the rest.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real

from lifecycle.errors import LmforgeError

# vLLM's _SAMPLING_EPS: a temperature this small is greedy (dividing logits by it only overflows).
GREEDY_TEMPERATURE_EPS = 1e-5
MAX_NUM_LOGPROBS = 20  # OpenAI's top_logprobs limit
MAX_NUM_STOP_STRINGS = 16
MAX_N = 16
_MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed accepts up to uint64


class InvalidRequestError(LmforgeError, ValueError):
    """A request the engine refuses at admission; `field` names the offending field (the API maps it
    to HTTP 400 / gRPC INVALID_ARGUMENT). The message starts with the field name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    if not isinstance(value, Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled and when it stops. Defaults sample at temperature 1 with no filter.

    Order in which the sampler applies them (serve/worker/sampler.py): repetition penalty, then
    presence/frequency penalties, then the `min_tokens` mask; greedy takes the argmax there; sampled
    rows go on through temperature, top-k, top-p, min-p (transformers' warper order) and draw.

    temperature          >= 0; below GREEDY_TEMPERATURE_EPS (e.g. 0) is greedy (argmax, ties -> lowest id).
    top_k                None (off) or >= 1: keep tokens whose logit >= the k-th largest (ties kept).
    top_p                (0, 1], 1 = off: the smallest most-likely set with mass >= top_p (ties kept).
    min_p                [0, 1), 0 = off: keep tokens with p >= min_p * max p.
    repetition_penalty   > 0, 1 = off. CTRL (Keskar et al. 2019) as transformers'
                         RepetitionPenaltyLogitsProcessor: for tokens in prompt + output, positive
                         logits are divided by it, negative ones multiplied.
    presence_penalty     [-2, 2], OpenAI's rule on output tokens only: logit -= presence * [count > 0]
    frequency_penalty    [-2, 2], OpenAI's rule on output tokens only: logit -= frequency * count
    seed                 None or [0, 2**64): this request's own generator; the same seed gives the same
                         tokens whatever else is in the batch (n > 1: see seed_for_completion).
    max_tokens           >= 1 tokens to generate (vLLM's default 16); clipped to the context left
                         (see `validate_against`).
    min_tokens           [0, max_tokens]: while fewer are generated, EOS and stop_token_ids are masked
                         out and stop strings are not checked (vLLM: a stop string must end in the text
                         of a token generated after the first min_tokens).
    stop                 up to 16 non-empty strings; the output is cut before the first match (a single
                         string is accepted and wrapped).
    stop_token_ids       ids >= 0 that stop generation (emitted in token_ids, finish reason STOP).
    ignore_eos           keep generating past EOS (benchmarks).
    n                    1..16 completions sharing the prompt's KV blocks.
    logprobs             None or 0..20: the chosen token's logprob plus the top-N alternatives.
    prompt_logprobs      None or 0..20: the same for each prompt token (evaluation).
    prompt_logprobs_start  >= 0: the first prompt token whose logprob the caller needs (scoring needs only the
                         continuation's). The prompt before it may come from the prefix cache, and its
                         entries may then be None; 0 = every token, which bypasses the cache.
    speculative          None = engine default; True / False force speculative decoding on / off.
    skip_special_tokens  leave special tokens out of the detokenized text.
    include_stop_str_in_output  keep the matched stop string at the end of the text (vLLM's flag; the
                         tokens are the same either way).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    prompt_logprobs_start: int = 0
    speculative: bool | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        self._check_real("temperature", lambda t: t >= 0.0, ">= 0 (0 = greedy)")
        self._check_optional_int("top_k", lambda k: k >= 1, ">= 1 (None: off)")
        self._check_real("top_p", lambda p: 0.0 < p <= 1.0, "in (0, 1] (1 = off)")
        self._check_real("min_p", lambda p: 0.0 <= p < 1.0, "in [0, 1) (0 = off)")
        self._check_real("repetition_penalty", lambda r: r > 0.0, "> 0 (1 = off)")
        self._check_real("presence_penalty", lambda x: -2.0 <= x <= 2.0, "in [-2, 2] (0 = off)")
        self._check_real("frequency_penalty", lambda x: -2.0 <= x <= 2.0, "in [-2, 2] (0 = off)")
        self._check_optional_int("seed", lambda s: 0 <= s <= _MAX_SEED, "in [0, 2**64) (None: unseeded)")
        self._check_int("max_tokens", lambda m: m >= 1, ">= 1")
        self._check_int("min_tokens", lambda m: m >= 0, ">= 0")
        if self.min_tokens > self.max_tokens:
            raise InvalidRequestError("min_tokens", f"must be <= max_tokens={self.max_tokens}, "
                                                    f"got {self.min_tokens}")
        self._check_int("n", lambda n: 1 <= n <= MAX_N, f"in [1, {MAX_N}]")
        self._check_optional_int("logprobs", lambda k: 0 <= k <= MAX_NUM_LOGPROBS,
                                 f"in [0, {MAX_NUM_LOGPROBS}] (None: off)")
        self._check_optional_int("prompt_logprobs", lambda k: 0 <= k <= MAX_NUM_LOGPROBS,
                                 f"in [0, {MAX_NUM_LOGPROBS}] (None: off)")
        self._check_int("prompt_logprobs_start", lambda k: k >= 0, ">= 0")
        self._check_stop()
        self._check_stop_token_ids()
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(name, f"must be true or false, got {getattr(self, name)!r}")
        if self.speculative is not None and not isinstance(self.speculative, bool):
            raise InvalidRequestError("speculative", f"must be null, true or false, got {self.speculative!r}")

    # -- validation helpers: each names its field, says the rule and echoes the bad value --------------

    def _check_real(self, name: str, rule: Callable[[float], bool], expected: str) -> None:
        value = getattr(self, name)
        if not _is_real(value) or not rule(value):
            raise InvalidRequestError(name, f"must be a finite number {expected}, got {value!r}")
        object.__setattr__(self, name, float(value))  # normalise ints and numpy scalars

    def _check_int(self, name: str, rule: Callable[[int], bool], expected: str) -> None:
        value = getattr(self, name)
        if not _is_int(value) or not rule(value):
            raise InvalidRequestError(name, f"must be an integer {expected}, got {value!r}")
        object.__setattr__(self, name, int(value))

    def _check_optional_int(self, name: str, rule: Callable[[int], bool], expected: str) -> None:
        if getattr(self, name) is not None:
            self._check_int(name, rule, expected)

    def _check_stop(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop):
            raise InvalidRequestError("stop", f"must be a list of non-empty strings, got {self.stop!r}")
        if len(stop) > MAX_NUM_STOP_STRINGS:
            raise InvalidRequestError("stop", f"at most {MAX_NUM_STOP_STRINGS} strings, got {len(stop)}")
        object.__setattr__(self, "stop", tuple(stop))

    def _check_stop_token_ids(self) -> None:
        ids = self.stop_token_ids
        if isinstance(ids, str | bytes) or not isinstance(ids, Sequence) \
                or not all(_is_int(t) and t >= 0 for t in ids):
            raise InvalidRequestError("stop_token_ids", f"must be a list of token ids >= 0, got {ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in ids))

    # -- derived ---------------------------------------------------------------------------------------

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def needs_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def seed_for_completion(self, index: int) -> int | None:
        """Completion `index` of n draws from its own generator seeded `seed + index` (as vLLM v1's
        ParentRequest), so n > 1 with a seed gives n different, reproducible completions."""
        return None if self.seed is None else (self.seed + index) % (_MAX_SEED + 1)

    def validate_against(self, vocab_size: int, max_model_len: int, num_prompt_tokens: int) -> SamplingParams:
        """The checks that need the model; returns the params to run with (self, or a clipped copy).

        Rejected: an empty prompt and a prompt of >= `max_model_len` tokens (field "prompt": no room
        for even one generated token, as vLLM), stop_token_ids or logprobs beyond the vocabulary.
        Clipped, not rejected: `max_tokens` (and `min_tokens` with it) to the context left,
        `max_model_len - num_prompt_tokens` — vLLM's engine stops there with finish reason "length"
        too, and a client asking for "as many as fit" should not have to know the prompt's token count.
        """
        if num_prompt_tokens <= 0:
            raise InvalidRequestError("prompt", "is empty: give at least one token")
        if num_prompt_tokens >= max_model_len:
            raise InvalidRequestError("prompt", f"has {num_prompt_tokens} tokens; the model's context is "
                                                f"{max_model_len}, leaving no room to generate: shorten it")
        bad_ids = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad_ids:
            raise InvalidRequestError("stop_token_ids", f"{bad_ids} not in the vocabulary "
                                                        f"(ids must be < {vocab_size})")
        for name in ("logprobs", "prompt_logprobs"):
            num_top = getattr(self, name)
            if num_top is not None and num_top > vocab_size:
                raise InvalidRequestError(name, f"asks for {num_top} alternatives; the vocabulary has "
                                                f"{vocab_size} tokens")
        max_new_tokens = max_model_len - num_prompt_tokens
        if self.max_tokens <= max_new_tokens:
            return self
        return dataclasses.replace(self, max_tokens=max_new_tokens,
                                   min_tokens=min(self.min_tokens, max_new_tokens))


class FinishReason(enum.Enum):
    STOP = "stop"                # EOS or one of stop_token_ids (OpenAI's "stop")
    LENGTH = "length"            # max_tokens, or the model's context, reached
    STOP_STRING = "stop_string"  # one of `stop` matched (OpenAI reports it as "stop" too)
    ABORT = "abort"              # the client cancelled or disconnected
    ERROR = "error"              # the engine failed this request (the others keep running)


@dataclass(frozen=True)
class Request:
    """One client request as admitted: immutable. The scheduler keeps the mutable state in `Sequence`.

    `priority`: lower is served first (as vLLM); FCFS by `arrival_time_s` among equals.
    `arrival_time_s` is `time.monotonic()` when the engine received it (timings are differences).
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    arrival_time_s: float
    priority: int = 0
    prompt_text: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise InvalidRequestError("request_id", f"must be a non-empty string, got {self.request_id!r}")
        ids = self.prompt_token_ids
        if isinstance(ids, str | bytes) or not isinstance(ids, Sequence) \
                or not all(_is_int(t) and t >= 0 for t in ids):
            raise InvalidRequestError("prompt_token_ids", "must be a list of token ids >= 0")
        object.__setattr__(self, "prompt_token_ids", tuple(int(t) for t in ids))
        if not _is_int(self.priority):
            raise InvalidRequestError("priority", f"must be an integer, got {self.priority!r}")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def validated_for(self, vocab_size: int, max_model_len: int) -> Request:
        """Admission check against the model: prompt ids inside the vocabulary (an id past it would
        crash the embedding lookup, on CUDA as a device-side assert that takes every request down),
        then `SamplingParams.validate_against`. Returns self or a copy with clipped params."""
        bad_ids = sorted({t for t in self.prompt_token_ids if t >= vocab_size})
        if bad_ids:
            raise InvalidRequestError("prompt_token_ids", f"{bad_ids[:8]} not in the vocabulary "
                                                          f"(ids must be < {vocab_size})")
        params = self.params.validate_against(vocab_size, max_model_len, self.num_prompt_tokens)
        return self if params is self.params else dataclasses.replace(self, params=params)


# -- outputs -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model's raw distribution (log_softmax of the logits before
    penalties, temperature and filters: vLLM's default "raw_logprobs"). `rank`: 1 + the number of tokens
    with a strictly larger logprob (1 = most likely; ties share the best rank). `text` is filled by
    the detokenizer."""

    token_id: int
    logprob: float
    rank: int | None = None
    text: str | None = None


@dataclass(frozen=True)
class Logprobs:
    """One position: the token that was chosen (generated, or the prompt's next token) and the top-N
    alternatives, most likely first (N = the request's `logprobs` / `prompt_logprobs`; may include the
    chosen token)."""

    chosen: TokenLogprob
    top: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class CompletionOutput:
    """What one of a request's n completions produced since the last RequestOutput (a delta)."""

    index: int  # 0..n-1
    token_ids: tuple[int, ...] = ()
    text: str = ""
    logprobs: tuple[Logprobs, ...] | None = None  # one per new token when the request asked for them
    finish_reason: FinishReason | None = None     # None while running
    stop_reason: str | int | None = None          # the stop string or stop token id that matched

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class RequestOutput:
    """One streamed delta of a request. `outputs` holds the completions with something new this step.

    `prompt_logprobs` comes in the request's first RequestOutput only: one entry per prompt token, the
    first None (nothing predicts it, as vLLM). `finished` is set once, on the last delta, when every
    completion has finished. Timings in seconds, None until known: `queue_s` arrival -> first scheduled,
    `ttft_s` arrival -> first generated token, `e2e_s` arrival -> finished.
    """

    request_id: str
    outputs: tuple[CompletionOutput, ...]
    finished: bool
    num_prompt_tokens: int
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    prompt_logprobs: tuple[Logprobs | None, ...] | None = None
    queue_s: float | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None


# -- metrics -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinishedRequestStats:
    """Timings of one finished request, in seconds, for the latency histograms. `ttft_s` is None when
    it ended (aborted, failed) before its first token; `itl_s` are the gaps between successive tokens."""

    request_id: str
    finish_reason: FinishReason
    num_prompt_tokens: int
    num_generation_tokens: int
    queue_s: float | None
    ttft_s: float | None
    itl_s: tuple[float, ...]
    e2e_s: float


@dataclass
class EngineStats:
    """A snapshot after one engine step. Gauges are current values; `*_total` and the prefix-cache
    counters are cumulative since the engine started (a skipped snapshot loses nothing; the metrics
    module increments its Prometheus counters by the difference). `finished_requests` lists the
    requests that finished in this step only."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use, in [0, 1]
    num_preemptions_total: int = 0
    num_prompt_tokens_total: int = 0
    num_generation_tokens_total: int = 0
    prefix_cache_queries_tokens: int = 0
    prefix_cache_hits_tokens: int = 0
    spec_draft_tokens_total: int = 0
    spec_accepted_tokens_total: int = 0
    finished_requests: list[FinishedRequestStats] = field(default_factory=list)

    @property
    def prefix_cache_hit_rate(self) -> float:
        queries = self.prefix_cache_queries_tokens
        return self.prefix_cache_hits_tokens / queries if queries else 0.0

    @property
    def spec_acceptance_rate(self) -> float:
        drafted = self.spec_draft_tokens_total
        return self.spec_accepted_tokens_total / drafted if drafted else 0.0
