"""Speculative decoding through vLLM, configured by our flags (--ngram): greedy outputs are those of the reference
backend without speculation (verification is lossless), and the spec-decode series count drafts and acceptances."""

from __future__ import annotations

import importlib.util

import pytest

from serve.api.grpc_server import GrpcServerConfig
from serve.metrics import ServerMetrics
from tests.serve.api.conftest import BackgroundServer

from .conftest import KV_CACHE_BYTES, REFERENCE

# Code repeats itself: prompt lookup finds its n-grams.
PROMPT = "def f(x):\n    return x\n\ndef g(x):\n    return x\n\ndef f(x):\n    return"


@pytest.fixture(scope="module")
def ngram_server(suite_checkpoint):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("backend vllm: `vllm` is not installed (its pip extra)")
    from serve.backends.vllm import VLLMBackend
    from serve.backends.vllm_config import VLLMConfig

    backend = VLLMBackend(VLLMConfig(model=str(suite_checkpoint), kv_cache_memory_bytes=KV_CACHE_BYTES,
                                     speculative_method="ngram", num_speculative_tokens=4))
    server = BackgroundServer(backend, GrpcServerConfig(port=0), load=False)
    try:
        server.call(server.server.load(), timeout_s=600)
        metrics = ServerMetrics()
        metrics.attach(backend, "spec", backend.model_info().max_model_len)
        yield server, metrics
    finally:
        server.stop()


def test_ngram_speculation_keeps_greedy_outputs_and_counts_acceptances(ngram_server, start_backend):
    server, metrics = ngram_server
    with start_backend(REFERENCE).client() as client:
        expected = client.generate(PROMPT, temperature=0, max_tokens=48, ignore_eos=True)
    with server.client() as client:
        info = client.model_info()
        got = client.generate(PROMPT, temperature=0, max_tokens=48, ignore_eos=True)
    assert info.backend == "vllm" and info.speculative.method == "ngram"
    assert list(got.completions[0].token_ids) == list(expected.completions[0].token_ids)
    drafted = metrics.registry.get_sample_value("lmforge:spec_decode_num_draft_tokens_total", {"model_name": "spec"})
    accepted = metrics.registry.get_sample_value("lmforge:spec_decode_num_accepted_tokens_total",
                                                 {"model_name": "spec"})
    assert drafted > 0 and 0 < accepted <= drafted
