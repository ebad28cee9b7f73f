"""A fake EvalTarget: deterministic answers, scripted transient failures, a record of what was asked."""

from __future__ import annotations

import threading
import zlib

from serve.evaluation.items import GenerationRequest, LoglikelihoodRequest, RollingRequest
from serve.evaluation.results import GenerationAnswer, LoglikelihoodAnswer, RollingAnswer
from serve.evaluation.target import TargetError, TransientError


def fake_logprob(text: str) -> float:
    return -1.0 - (zlib.crc32(text.encode()) % 1000) / 100.0


class FakeTarget:
    def __init__(self, *, model: str = "fake", transient_failures: int = 0, refuse_context: str | None = None,
                 gate: threading.Event | None = None) -> None:
        self.model = model
        self.transient_failures = transient_failures  # the first N calls fail with TransientError
        self.refuse_context = refuse_context
        self.gate = gate
        self.asked: list[object] = []
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()

    def describe(self):
        return {"target": "fake://", "model": self.model, "api": "fake"}

    def answer(self, request):
        with self._lock:
            self.asked.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            fail = self.transient_failures > 0
            self.transient_failures -= fail
        try:
            if self.gate is not None:
                self.gate.wait(10)
            if fail:
                raise TransientError("UNAVAILABLE: try again")
            if isinstance(request, LoglikelihoodRequest):
                if request.context == self.refuse_context:
                    raise TargetError("INVALID_ARGUMENT: too long")
                lps = tuple(fake_logprob(request.context + c) for c in request.continuations)
                return LoglikelihoodAnswer(lps, tuple(False for _ in lps), tuple(len(c.split()) for c in request.continuations))
            if isinstance(request, RollingRequest):
                return RollingAnswer(fake_logprob(request.text) * len(request.text), len(request.text))
            assert isinstance(request, GenerationRequest)
            return GenerationAnswer(" #### 4")
        finally:
            with self._lock:
                self.in_flight -= 1

    def close(self):
        pass
