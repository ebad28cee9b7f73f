"""Backoff arithmetic and the retry loop, with a fake clock."""

from __future__ import annotations

import pytest

from lifecycle.errors import ConfigError
from serve.evaluation.retry import RetryPolicy, backoff_s, call_with_retries
from serve.evaluation.target import TargetError, TransientError


def test_backoff_grows_exponentially_capped_with_jitter_below():
    policy = RetryPolicy(initial_backoff_s=0.5, max_backoff_s=4.0, multiplier=2.0, jitter=0.5)
    assert [backoff_s(policy, n, 0.0) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff_s(policy, 1, 0.999) == pytest.approx(1.0 * (1 - 0.5 * 0.999))


def test_retries_transient_failures_then_succeeds():
    calls, slept = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise TransientError("UNAVAILABLE")
        return "ok"

    policy = RetryPolicy(max_attempts=5, initial_backoff_s=1.0, jitter=0.0)
    assert call_with_retries(flaky, policy, sleep=slept.append) == "ok"
    assert len(calls) == 3 and slept == [1.0, 2.0]


def test_gives_up_after_max_attempts_and_never_retries_permanent_errors():
    slept = []

    def down():
        raise TransientError("RESOURCE_EXHAUSTED")

    with pytest.raises(TransientError, match="gave up after 3 attempts"):
        call_with_retries(down, RetryPolicy(max_attempts=3), sleep=slept.append)
    assert len(slept) == 2

    def refused():
        raise TargetError("INVALID_ARGUMENT")

    with pytest.raises(TargetError):
        call_with_retries(refused, RetryPolicy(), sleep=slept.append)
    assert len(slept) == 2


def test_bad_policy():
    with pytest.raises(ConfigError, match="--max-attempts"):
        RetryPolicy(max_attempts=0)
