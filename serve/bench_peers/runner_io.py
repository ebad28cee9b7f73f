"""The boundary between `lmforge bench engine` and a peer runner running in another environment.

Standard library only: the runners (`vllm_runner.py`, `ort_genai_runner.py`) run under the peers'
python (`.venv-peers`, which has no lmforge) and import this file as a sibling module.

Call order (the runner's side):
  1. the bench writes one `RunnerSpec` as JSON on the runner's stdin;
  2. the runner warms up once, then runs `spec.prompts` (token ids, greedy, ignore EOS, `output_len` new tokens each);
  3. the runner prints one line `RESULT_PREFIX + json` on stdout, with `token_ids` (one list per prompt, in order)
     and the workload's metrics: `w1` -> output_tokens_per_s, elapsed_s, output_tokens;
     `w2` -> ttft_ms, itl_median_ms, decode_tokens_per_s, output_tokens (see `stream_stats`).
Anything else on stdout (peers log freely) is ignored; a runner that fails exits non-zero.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

# A marker no library prints, so the result line is found among a peer's own log lines.
RESULT_PREFIX = "LMFORGE_PEER_RESULT "
RESULT_KEYS = {"w1": ("output_tokens_per_s", "elapsed_s", "output_tokens", "token_ids"),
               "w2": ("ttft_ms", "itl_median_ms", "decode_tokens_per_s", "output_tokens", "token_ids")}


class RunnerError(RuntimeError):
    """A peer runner exited badly or printed no (or a malformed) result line."""


@dataclass(frozen=True)
class RunnerSpec:
    """One workload for one peer: what the runner reads from stdin."""

    workload: str  # "w1" (all prompts at once, throughput) or "w2" (one prompt, streamed)
    model: str  # a Hugging Face checkpoint dir (vLLM) or an exported ONNX dir (onnxruntime-genai)
    prompts: list[list[int]]  # token ids, given to the peer as ids so no tokenizer can differ
    output_len: int  # new tokens per prompt, EOS ignored
    options: dict[str, Any] = field(default_factory=dict)  # peer-specific, e.g. {"kv_cache_gib": 2}

    def __post_init__(self) -> None:
        if self.workload not in RESULT_KEYS:
            raise ValueError(f"workload {self.workload!r}: a runner knows {sorted(RESULT_KEYS)}")
        if self.workload == "w2" and len(self.prompts) != 1:
            raise ValueError(f"w2 is a single stream: got {len(self.prompts)} prompts")
        if not self.prompts or self.output_len <= 0:
            raise ValueError("a runner needs at least one prompt and output_len > 0")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RunnerSpec:
        return cls(**json.loads(text))

    @property
    def max_model_len(self) -> int:
        return max(map(len, self.prompts)) + self.output_len

    @property
    def warmup_prompt(self) -> list[int]:
        """The first prompt reversed: as long, but with other leading blocks, so a prefix cache (vLLM enables
        one by default) cannot serve the measured run from what the warm-up left behind."""
        return list(reversed(self.prompts[0]))


def read_spec() -> RunnerSpec:
    return RunnerSpec.from_json(sys.stdin.read())


def emit_result(result: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def parse_result(stdout: str, workload: str) -> dict[str, Any]:
    """The last result line of a runner's stdout, checked for the keys its workload promises."""
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        raise RunnerError(f"the runner printed no line starting with {RESULT_PREFIX.strip()!r}")
    try:
        result = json.loads(lines[-1][len(RESULT_PREFIX):])
    except json.JSONDecodeError as err:
        raise RunnerError(f"the runner's result line is not JSON: {err}") from None
    missing = [k for k in RESULT_KEYS[workload] if k not in result]
    if missing:
        raise RunnerError(f"the runner's {workload} result lacks {missing}")
    return result


def stream_stats(start_s: float, stamps_s: list[float]) -> dict[str, Any]:
    """TTFT and median inter-token latency from the arrival times of each token (perf_counter seconds).

    Tokens that arrive together (several per step) share a stamp and add gaps of 0, as a streaming client
    would see them; in W2 every engine delivers one token per step, so the median gap is the decode step.
    """
    if not stamps_s:
        raise ValueError("no token arrived")
    gaps = [b - a for a, b in zip(stamps_s, stamps_s[1:])]
    itl = statistics.median(gaps) if gaps else None
    return {"ttft_ms": (stamps_s[0] - start_s) * 1e3, "itl_median_ms": itl * 1e3 if itl is not None else None,
            "decode_tokens_per_s": 1.0 / itl if itl else None, "output_tokens": len(stamps_s)}


def throughput_stats(elapsed_s: float, token_ids: list[list[int]]) -> dict[str, Any]:
    num_out = sum(map(len, token_ids))
    return {"output_tokens_per_s": num_out / elapsed_s, "elapsed_s": elapsed_s, "output_tokens": num_out}
