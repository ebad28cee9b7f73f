"""ObservedEngine: an LLMEngine that also hands every stats snapshot it makes to a callback.

`LLMEngine.stats()` drains the finished-request list, and `AsyncEngine` calls it after every step and
keeps only the latest snapshot, so a poller of `AsyncEngine.stats()` loses the finished requests of the
steps between two polls. Wrapping `stats()` sees every snapshot whoever asks for it, without touching the
engine. (A `stats_listener` argument on AsyncEngine would say this more directly; until the engine has
one, this subclass is the hook.) Imported lazily by serve/backends/native.py: it needs torch.
"""

from __future__ import annotations

from collections.abc import Callable

from serve.engine.llm_engine import EngineConfig, LLMEngine
from serve.types import EngineStats


class ObservedEngine(LLMEngine):
    def __init__(self, config: EngineConfig, publish: Callable[[EngineStats], None]) -> None:
        super().__init__(config)
        self._publish = publish

    def stats(self) -> EngineStats:
        snapshot = super().stats()
        self._publish(snapshot)  # NativeBackend._publish_stats: never raises
        return snapshot
