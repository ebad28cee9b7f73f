"""The two sides of the comparison, as streaming functions for serve/bench_serve/load.py:

- `ServerProcess`: `lmforge serve` in a child process (`python -m serve serve`, the command people run), started
  with flags derived from one ServeConfig, on a free loopback port; stopped with SIGTERM (graceful).
- `GrpcStreams`: N grpc.aio channels to it (one per client: N clients are N connections), each request a
  server-streaming GenerateStream with token-id prompts.
- `InProcessEngine`: the engine of the same ServeConfig (its `engine_config()`), behind AsyncEngine in this
  process, streamed by the same load generator: what the server would give with no gRPC in between.
- `InProcessBackend`: the same for another backend (`--backend vllm`): the server's Backend class in this process.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from lifecycle.errors import LmforgeError


class BenchServerError(LmforgeError):
    """The benchmarked server did not start (or died); the message ends with its log's tail."""


def serve_argv(serve_config: Any) -> list[str]:
    """`lmforge serve` flags reproducing `serve_config` (a serve.launch.ServeConfig): every field that differs
    from its default, so the server's engine is configured exactly as `serve_config.engine_config()`."""
    from lifecycle.config import flag_name

    argv: list[str] = []
    for f in dataclasses.fields(serve_config):
        value = getattr(serve_config, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if value == default or value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag_name(f.name) if value else "--no-" + f.name.replace("_", "-"))
        else:
            argv += [flag_name(f.name), str(value)]
    return argv


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process and all its threads so far (Linux /proc; None elsewhere)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is fields[0], utime fields[11]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServerProcess:
    """`python -m serve serve ...` with stdout and stderr in `log_path`."""

    def __init__(self, serve_config: Any, log_path: Path) -> None:
        self.argv = [sys.executable, "-m", "serve", "serve", *serve_argv(serve_config)]
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        self.address: str | None = None

    def start(self, timeout_s: float) -> str:
        """Start, wait until health says SERVING; returns host:port."""
        import grpc

        from serve.client import Client

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w", encoding="utf-8") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while self.address is None:
            match = re.search(r"listening on (\S+):(\d+) ", self._log())
            if match:
                self.address = f"{match.group(1)}:{match.group(2)}"
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BenchServerError(f"the server did not start ({' '.join(self.argv[2:])}): {self.tail()}")
            else:
                time.sleep(0.1)
        # Health polled here rather than with Client.wait_until_serving, to notice at once a server process that died.
        with Client(self.address) as client:
            while True:
                try:
                    if client.health(timeout_s=2.0) == "SERVING":
                        break
                except grpc.RpcError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise BenchServerError(f"the server at {self.address} was not SERVING within {timeout_s:g} s: "
                                           f"{self.tail()}")
                time.sleep(0.2)
        return self.address

    def cpu_s(self) -> float | None:
        return process_cpu_s(self.proc.pid) if self.proc is not None and self.proc.poll() is None else None

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise BenchServerError(f"the server exited during the benchmark: {self.tail()}")

    def stop(self, grace_s: float = 60.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL after `grace_s`; the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def _log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def tail(self, num_lines: int = 8) -> str:
        lines = self._log().strip().splitlines()[-num_lines:]
        return " | ".join(lines) if lines else f"(nothing in {self.log_path})"


class GrpcStreams:
    """One grpc.aio channel per client to `address`; `stream` is a load.StreamFn. Use inside the event loop:
    `await open(n)`, run the level, `await close()`."""

    def __init__(self, address: str, output_len: int, *, token: str | None = None, timeout_s: float = 900.0) -> None:
        self.address = address
        self.output_len = output_len
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout_s = timeout_s
        self._stubs: list[Any] = []
        self._channels: list[Any] = []

    async def open(self, num_clients: int, ready_timeout_s: float = 60.0) -> None:
        import asyncio

        import grpc

        from serve.api._gen.lmforge.v1 import generation_pb2_grpc

        self._channels = [grpc.aio.insecure_channel(self.address) for _ in range(num_clients)]
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in self._channels)), ready_timeout_s)
        self._stubs = [generation_pb2_grpc.GenerationStub(c) for c in self._channels]

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        self._channels, self._stubs = [], []

    async def stream(self, client: int, prompt: list[int]) -> AsyncIterator[tuple[int, int | None]]:
        from serve.client import generate_request

        request = generate_request(prompt, max_tokens=self.output_len, temperature=0.0, ignore_eos=True)
        call = self._stubs[client].GenerateStream(request, timeout=self.timeout_s, metadata=self.metadata)
        async for response in call:
            num_new = sum(len(c.token_ids) for c in response.completions)
            yield num_new, (response.usage.completion_tokens if response.finished else None)


class InProcessEngine:
    """The engine of `engine_config` behind AsyncEngine, in this process; `stream` is a load.StreamFn."""

    def __init__(self, engine_config: Any, output_len: int) -> None:
        from serve.engine.async_engine import AsyncEngine
        from serve.engine.llm_engine import LLMEngine
        from serve.types import SamplingParams

        self.engine = AsyncEngine(LLMEngine(engine_config))
        self.params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        self._ids = itertools.count()

    async def stream(self, client: int, prompt: list[int]) -> AsyncIterator[tuple[int, int | None]]:
        async for out in self.engine.generate(f"bench-{next(self._ids)}", prompt, self.params):
            yield sum(len(c.token_ids) for c in out.outputs), None

    def num_preemptions(self) -> int:
        return self.engine.stats().num_preemptions_total

    def shutdown(self) -> None:
        self.engine.shutdown()


class InProcessBackend:
    """A serve Backend (serve/backends; the class `lmforge serve --backend` builds) in this process; `stream` is a
    load.StreamFn. `start` and `shutdown` run on the event loop that streams: vLLM's engine binds to it."""

    def __init__(self, backend: Any, output_len: int) -> None:
        from serve.types import SamplingParams

        self.backend = backend
        self.params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        self._ids = itertools.count()

    async def start(self) -> None:
        await self.backend.start()

    async def stream(self, client: int, prompt: list[int]) -> AsyncIterator[tuple[int, int | None]]:
        async for out in self.backend.generate(f"bench-{next(self._ids)}", prompt, self.params):
            yield sum(len(c.token_ids) for c in out.outputs), None

    def num_preemptions(self) -> int:
        return self.backend.stats().num_preemptions_total

    async def shutdown(self) -> None:
        await self.backend.shutdown()


def warm_up_prompts(prompts: Sequence[list[int]]) -> list[list[int]]:
    """Prompts as long as the first, reversed, so the warm-up leaves nothing in the prefix cache that a
    measured request could reuse (the measured prompts are random and distinct)."""
    return [list(reversed(prompts[0]))]
