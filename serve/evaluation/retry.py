"""Retries with exponential backoff for failures a target reports as transient (serve/evaluation/target.py).

Delay before retry n (0-based): min(max_backoff_s, initial_backoff_s * multiplier**n), scaled by a random
factor in [1 - jitter, 1] so that many clients refused at once (RESOURCE_EXHAUSTED) do not come back at once
("equal jitter", AWS Architecture Blog, "Exponential Backoff and Jitter", 2015).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from lifecycle.errors import ConfigError
from serve.evaluation.target import TransientError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8  # tries in all, the first included
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 20.0
    multiplier: float = 2.0
    jitter: float = 0.5  # the delay is scaled by a factor drawn from [1 - jitter, 1]

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError(f"--max-attempts: must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s or self.multiplier < 1:
            raise ConfigError("retry backoff: need 0 <= initial <= max and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ConfigError(f"retry jitter must be in [0, 1], got {self.jitter}")


def backoff_s(policy: RetryPolicy, retry: int, u: float) -> float:
    """The delay before retry number `retry` (0-based), with `u` uniform in [0, 1)."""
    base = min(policy.max_backoff_s, policy.initial_backoff_s * policy.multiplier ** retry)
    return base * (1.0 - policy.jitter * u)


def call_with_retries(fn: Callable[[], T], policy: RetryPolicy, *, sleep: Callable[[float], None] = time.sleep,
                      uniform: Callable[[], float] = random.random,
                      on_retry: Callable[[int, TransientError], None] | None = None) -> T:
    """`fn()`, retried on TransientError up to `policy.max_attempts` tries; the last error is raised."""
    for attempt in range(policy.max_attempts):
        try:
            return fn()
        except TransientError as err:
            if attempt + 1 == policy.max_attempts:
                raise TransientError(f"{err} (gave up after {policy.max_attempts} attempts)") from None
            if on_retry is not None:
                on_retry(attempt, err)
            sleep(backoff_s(policy, attempt, uniform()))
    raise AssertionError("unreachable")
