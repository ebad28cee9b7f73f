"""`lmforge bench engine` smoke run at toy size: every workload and peer writes its numbers."""

from __future__ import annotations

import json

import pytest

from lifecycle.errors import ConfigError
from serve.bench_engine import BenchEngineConfig, bench_engine


def test_bench_engine_smoke(tmp_path, trained_checkpoint):
    out = tmp_path / "engine.json"
    report = bench_engine(BenchEngineConfig(model=str(trained_checkpoint), workloads=["w1", "w2", "w4"],
                                            num_requests=3, prompt_len=16,
                                            output_len=4, latency_output_len=4, prefix_len=64, output=str(out)))
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    res = saved["results"]
    assert res["w1"]["native"]["output_tokens"] == 12 and res["w1"]["transformers"]["output_tokens"] == 12
    assert res["w2"]["native"]["output_tokens"] == 4 and res["w2"]["native"]["ttft_ms"] > 0
    assert 0 < res["w4"]["native"]["warm_over_cold"]
    assert saved["machine"]["fp32_matmul_gflops"] > 0 and (tmp_path / "engine.png").is_file()


def test_bench_engine_w3_speculative(tmp_path, trained_checkpoint):
    """The target as its own draft: every draft is accepted and outputs are identical."""
    report = bench_engine(BenchEngineConfig(model=str(trained_checkpoint), workloads=["w3"], peers=["none"],
                                            target=str(trained_checkpoint), draft=str(trained_checkpoint),
                                            latency_output_len=12, spec_prompts=2, output=str(tmp_path / "e.json")))
    w3 = report["results"]["w3"]["native"]
    assert w3["outputs_identical"] and w3["acceptance_rate"] == 1.0
    assert w3["speculative"]["tokens_per_step"] > w3["plain"]["tokens_per_step"]


def test_bench_engine_bad_flags():
    with pytest.raises(ConfigError, match="--workloads"):
        BenchEngineConfig(workloads=["w9"])
    with pytest.raises(ConfigError, match="--peers"):
        BenchEngineConfig(peers=["tgi"])
