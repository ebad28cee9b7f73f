"""QuantConfig: what a quantized checkpoint was made with (recorded in its manifest) and how to parse
the `METHOD[:BITS[:GROUP]]` specs of `lmforge quantize --method/--compare`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lifecycle.errors import ConfigError
from quant.primitives import SUPPORTED_BITS

METHODS = ("gptq", "rtn", "int8", "nf4")
# int8 and nf4 have one bit width; gptq/rtn default to 4-bit g128, the common GPTQ release setting.
DEFAULT_BITS = {"gptq": 4, "rtn": 4, "int8": 8, "nf4": 4}


@dataclass
class QuantConfig:
    method: str = "gptq"
    bits: int = 4
    group_size: int | None = 128  # None: one scale per output channel
    sym: bool = True
    act_order: bool = False  # GPTQ: quantize columns by decreasing Hessian diagonal (§4 "act-order" heuristic)
    static_groups: bool = False  # GPTQ with act-order: group grids fixed from the unquantized weight
    true_sequential: bool = True  # GPTQ: within a block, q/k/v, then o, then gate/up, then down
    damp_percent: float = 0.01  # GPTQ: λ = damp_percent · mean(diag H) added to H (§4 "Cholesky reformulation")
    block_size: int = 128  # GPTQ: columns per lazy batch update (§4 "lazy batch-updates")
    num_samples: int = 128  # calibration sequences
    seq_len: int = 512  # tokens per calibration sequence
    double_quant: bool = True  # nf4: quantize the absmax constants too (QLoRA §3)
    nf4_blocksize: int = 64
    quantize_lm_head: bool = False  # the LM head too (embeddings never); issue: "unquantized unless asked"
    solver: str = "lmforge"  # gptq: our solver (quant/gptq.py) or GPTQModel's ("gptqmodel")
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method: unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.method in ("gptq", "rtn") and self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"--bits: {self.bits} is not supported for {self.method}; "
                              f"use one of {', '.join(map(str, SUPPORTED_BITS))}")
        if self.method == "int8" and self.bits != 8:
            raise ConfigError(f"--bits: int8 is 8-bit, got {self.bits}")
        if self.method == "nf4" and self.bits != 4:
            raise ConfigError(f"--bits: nf4 is 4-bit, got {self.bits}")
        if self.group_size is not None and self.group_size <= 0:
            raise ConfigError(f"--group-size: {self.group_size} must be positive (or 'channel' for per-channel)")
        if self.method in ("int8", "nf4") and self.group_size is not None:
            raise ConfigError(f"--group-size: {self.method} is per-channel/blockwise; do not give a group size")
        if self.static_groups and not self.act_order:
            raise ConfigError("--static-groups only changes anything with --act-order")
        if not 0 <= self.damp_percent < 1:
            raise ConfigError(f"--damp-percent: {self.damp_percent} must be in [0, 1)")
        if self.block_size <= 0:
            raise ConfigError(f"--block-size: {self.block_size} must be positive")
        if self.num_samples <= 0:
            raise ConfigError(f"--num-samples: {self.num_samples} must be positive")
        if self.seq_len <= 1:
            raise ConfigError(f"--seq-len: {self.seq_len} must be at least 2")
        if self.nf4_blocksize not in (64, 128, 256):
            raise ConfigError(f"--nf4-blocksize: {self.nf4_blocksize}; use 64, 128 or 256")
        if self.solver not in ("lmforge", "gptqmodel"):
            raise ConfigError(f"solver {self.solver!r}: use lmforge or gptqmodel (e.g. gptq:4:128@gptqmodel)")
        if self.quantize_lm_head and self.solver == "gptqmodel":
            raise ConfigError("--quantize-lm-head: only with lmforge's solver (drop @gptqmodel)")
        if self.solver == "gptqmodel" and self.method != "gptq":
            raise ConfigError(f"solver gptqmodel quantizes gptq methods only, not {self.method}")

    @property
    def label(self) -> str:
        if self.method in ("int8", "nf4"):
            return self.method
        suffix = "@gptqmodel" if self.solver == "gptqmodel" else ""
        return f"{self.method}:{self.bits}:{self.group_size or 'channel'}{suffix}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_spec(spec: str, **overrides: Any) -> QuantConfig:
    """`gptq:4:128`, `rtn:3:channel`, `int8`, `nf4`, `gptq:4:128@gptqmodel` -> QuantConfig (other fields from
    `overrides`)."""
    body, _, solver = spec.strip().lower().partition("@")
    if solver:
        overrides = {**overrides, "solver": solver}
    parts = body.split(":")
    method = parts[0]
    if method not in METHODS:
        raise ConfigError(f"method spec {spec!r}: unknown method {method!r}; use one of {', '.join(METHODS)} "
                          "(e.g. gptq:4:128, rtn:3:128, int8, nf4)")
    if method in ("int8", "nf4"):
        if len(parts) > 1:
            raise ConfigError(f"method spec {spec!r}: {method} takes no bits or group size")
        return QuantConfig(method=method, bits=DEFAULT_BITS[method], group_size=None, **overrides)
    if len(parts) > 3:
        raise ConfigError(f"method spec {spec!r}: expected METHOD:BITS:GROUP (e.g. gptq:4:128)")
    try:
        bits = int(parts[1]) if len(parts) > 1 and parts[1] else DEFAULT_BITS[method]
    except ValueError:
        raise ConfigError(f"method spec {spec!r}: bits {parts[1]!r} is not an integer") from None
    group: int | None = 128
    if len(parts) > 2:
        if parts[2] in ("channel", "none", "-1"):
            group = None
        else:
            try:
                group = int(parts[2])
            except ValueError:
                raise ConfigError(f"method spec {spec!r}: group size {parts[2]!r} is not an integer or 'channel'") from None
    return QuantConfig(method=method, bits=bits, group_size=group, **overrides)
