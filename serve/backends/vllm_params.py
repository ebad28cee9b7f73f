"""Translation between our boundary types (serve/types.py) and vLLM's, as pure functions (no vllm import).

`sampling_kwargs` maps our SamplingParams to the keyword arguments of `vllm.SamplingParams`, field by field
(the table is in serve/backends/vllm.py's docstring); what vLLM cannot do raises InvalidRequestError naming
the field. `finish_reason` and `logprobs_position` read vLLM's outputs back. They take plain values and
duck-typed objects, so their unit tests need no engine (tests/serve/backends/test_vllm_params.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from serve.types import FinishReason, InvalidRequestError, Logprobs, SamplingParams, TokenLogprob

# Our fields that pass to vLLM under the same name with the same meaning (checked ranges are ours, vLLM's
# accept every value ours do).
SAME_NAME_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                    "seed", "max_tokens", "min_tokens", "ignore_eos", "n", "logprobs", "prompt_logprobs",
                    "skip_special_tokens", "include_stop_str_in_output")
# vLLM's finish_reason strings (vllm/v1/engine FINISH_REASON_STRINGS) -> ours; "stop" is split below.
_FINISH_REASONS = {"length": FinishReason.LENGTH, "abort": FinishReason.ABORT, "error": FinishReason.ERROR}


def sampling_kwargs(params: SamplingParams, *, speculative_method: str | None) -> dict[str, Any]:
    """Keyword arguments for `vllm.SamplingParams(**kwargs, output_kind=DELTA)`.

    `speculative_method` is the engine's ("ngram", "draft" or None): vLLM decides speculation per engine,
    not per request, so a request that forces it the other way is refused unless forcing cannot change
    anything (one generated token: no draft is ever verified, e.g. the Scorer's requests).
    """
    if params.is_greedy and params.n > 1:  # vLLM's SamplingParams refuses it ("n must be 1 when using greedy")
        raise InvalidRequestError("n", f"is {params.n} with greedy sampling (temperature 0), which the vLLM backend "
                                       "cannot run (vLLM refuses n identical greedy copies): send n=1, or sample "
                                       "with temperature > 0")
    kwargs: dict[str, Any] = {name: getattr(params, name) for name in SAME_NAME_FIELDS}
    kwargs["top_k"] = 0 if params.top_k is None else params.top_k  # vLLM: 0 (or -1) = off
    kwargs["stop"] = list(params.stop)
    kwargs["stop_token_ids"] = list(params.stop_token_ids)
    # prompt_logprobs_start only permits leaving earlier entries out (they may be None); vLLM returns them all,
    # which satisfies it, and reads no prefix cache for prompt-logprob requests (vllm/v1/request.py).
    if params.speculative is not None and params.max_tokens > 1:
        engine_speculates = speculative_method is not None
        if params.speculative and not engine_speculates:
            raise InvalidRequestError("speculative", "is true but the server runs no speculative decoding (start it "
                                                     "with --ngram or --draft-model), and vLLM cannot turn it on per "
                                                     "request: send null")
        if not params.speculative and engine_speculates:
            raise InvalidRequestError("speculative", f"is false but the vLLM backend speculates ({speculative_method}) "
                                                     "for every request and cannot turn it off per request: send null, "
                                                     "or serve with --backend native")
    return kwargs


def finish_reason(reason: str | None, stop_reason: int | str | None) -> FinishReason | None:
    """vLLM's finish_reason string -> ours. vLLM says "stop" for EOS, a stop token and a stop string alike;
    its `stop_reason` is the matched string (ours: STOP_STRING), the stop token id, or None (EOS)."""
    if reason is None:
        return None
    if reason == "stop":
        return FinishReason.STOP_STRING if isinstance(stop_reason, str) else FinishReason.STOP
    try:
        return _FINISH_REASONS[reason]
    except KeyError:
        raise ValueError(f"vLLM finished a request with an unknown reason {reason!r}") from None


def logprobs_position(chosen_id: int, position: Mapping[int, Any], num_top: int) -> Logprobs:
    """One position of vLLM's logprobs (a dict token id -> Logprob(logprob, rank, decoded_token), the chosen
    token plus the top `num_top`, in no promised order) -> ours: the chosen token and the top-N most likely
    first. vLLM's logprobs are the raw model distribution (logprobs_mode "raw_logprobs"), as ours."""
    def entry(token_id: int) -> TokenLogprob:
        lp = position[token_id]
        return TokenLogprob(token_id=int(token_id), logprob=float(lp.logprob), rank=lp.rank, text=lp.decoded_token)

    top = sorted((t for t in position if position[t].rank is not None and position[t].rank <= num_top),
                 key=lambda t: (position[t].rank, t))[:num_top]
    return Logprobs(chosen=entry(chosen_id), top=tuple(entry(t) for t in top))
