"""`lmforge bench serve` at toy size (a real server process, real gRPC clients, the in-process engine), the
load generator's statistics against numpy, the server flags it derives, and its bad flags. No timing is
asserted: the machine is shared; only that every request finished and every token is accounted for."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from lifecycle.errors import ConfigError
from serve.bench_serve import BenchServeConfig, bench_serve
from serve.bench_serve.load import RequestRecord, percentile, summarize_level
from serve.bench_serve.run import serve_config_for
from serve.bench_serve.targets import serve_argv


def test_bench_serve_small_run(tmp_path, trained_checkpoint):
    out = tmp_path / "serve.json"
    report = bench_serve(BenchServeConfig(model=str(trained_checkpoint), concurrency=[4, 1], min_requests=3,
                                          prompt_len=12, output_len=5, output=str(out), progress=False))
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert (tmp_path / "serve.md").is_file() and (tmp_path / "serve.png").stat().st_size > 0
    assert saved["server_config"]["max_concurrent_requests"] == 4 and saved["server_config"]["max_queue_length"] == 4
    result = saved["results"]["native"]
    assert result["server"]["exit_code"] == 0  # SIGTERM: a graceful stop
    levels = result["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 4]
    for level, num_requests in zip(levels, (3, 4)):  # max(N, min_requests)
        for side in ("grpc", "in_process"):
            stats = level[side]
            assert stats["num_requests"] == stats["num_ok"] == num_requests
            assert stats["errors"] == {} and stats["num_wrong_length"] == 0
            assert stats["output_tokens"] == stats["expected_output_tokens"] == num_requests * 5
            assert stats["output_tokens_per_s"] > 0
            for key in ("ttft_ms", "itl_ms", "e2e_ms"):
                assert 0 <= stats[key]["p50"] <= stats[key]["p90"] <= stats[key]["p99"]
        # The server's own count (usage.completion_tokens of each stream's last message) agrees with the client's.
        assert level["grpc"]["reported_output_tokens"] == num_requests * 5
        # The server's CPU time comes from /proc/<pid>/stat, counted in clock ticks (10 ms): a level this small can
        # run within one tick, so only its presence is checked; the client's (process_time) is exact.
        assert level["grpc"]["client_cpu_s"] > 0 and level["grpc"]["server_cpu_s"] >= 0
        assert level["in_process"]["num_preemptions"] == 0
        assert level["grpc_over_in_process"] == pytest.approx(
            level["grpc"]["output_tokens_per_s"] / level["in_process"]["output_tokens_per_s"])
    markdown = (tmp_path / "serve.md").read_text()
    assert "| native | 4 | 4 | 0 |" in markdown


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for size in (1, 2, 7, 100):
        values = rng.exponential(size=size).tolist()
        for q in (0, 50, 90, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 50) is None


def test_summarize_level_counts_errors_and_short_streams():
    ok = RequestRecord(start_s=0.0, end_s=0.4, stamps_s=[0.1, 0.2, 0.2, 0.4], reported_tokens=4)
    short = RequestRecord(start_s=0.0, end_s=0.3, stamps_s=[0.3], reported_tokens=1)
    refused = RequestRecord(start_s=0.0, end_s=0.01, status="RESOURCE_EXHAUSTED", detail="at its limit")
    s = summarize_level(8, [ok, short, refused], elapsed_s=0.5, output_len=4)
    assert s["num_requests"] == 3 and s["num_ok"] == 2 and s["num_wrong_length"] == 1
    assert s["errors"] == {"RESOURCE_EXHAUSTED": 1} and s["error_examples"]["RESOURCE_EXHAUSTED"] == "at its limit"
    assert s["output_tokens"] == 5 and s["expected_output_tokens"] == 12 and s["reported_output_tokens"] == 5
    assert s["output_tokens_per_s"] == pytest.approx(10.0)
    assert s["ttft_ms"]["p50"] == pytest.approx(200.0)  # TTFTs 100 and 300 ms
    assert s["itl_ms"]["p50"] == pytest.approx(100.0)  # gaps 100, 0, 200 ms: tokens of one chunk add a 0


def test_the_server_is_started_with_the_in_process_engines_config(trained_checkpoint):
    """serve_argv reproduces the ServeConfig: parsed back by `lmforge serve`'s own parser, it is equal."""
    from lifecycle.config import add_config_arguments, config_from_args
    from serve.launch import ServeConfig

    cfg = BenchServeConfig(model=str(trained_checkpoint), concurrency=[1, 300], kv_cache_memory_bytes=1 << 26,
                           max_num_batched_tokens=512)
    serve_cfg = serve_config_for(cfg, trained_checkpoint)
    assert serve_cfg.max_concurrent_requests == 300 and serve_cfg.max_num_seqs == 300
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ServeConfig)
    parsed = config_from_args(ServeConfig, parser.parse_args(serve_argv(serve_cfg)))
    assert parsed == serve_cfg and parsed.engine_config() == serve_cfg.engine_config()


@pytest.mark.parametrize("kwargs, message", [
    ({"backend": ["native,tgi"]}, r"--backend: unknown \['tgi'\]; available: native, vllm"),
    ({"backend": ["tgi"]}, "--backend: unknown"),
    ({"concurrency": [0, 8]}, "--concurrency"),
    ({"output_len": 0}, "--output-len"),
    ({"target": "localhost"}, "--target localhost: give host:port"),
    ({"target": "127.0.0.1:1", "backend": ["native", "native"], "auth_token_env": "X", "auth_token_file": "f"},
     "give one source"),
    ({"auth_token_env": "SOME_VAR"}, "only for --target"),
])
def test_bad_flags_are_refused_naming_them(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        BenchServeConfig(**kwargs)


def test_backend_list_is_parsed_in_order_once():
    assert BenchServeConfig(backend=["native", "native"]).backend == ["native"]
    assert BenchServeConfig(backend=["vllm,native", "vllm"]).backend == ["vllm", "native"]


def test_the_vllm_server_and_in_process_backend_share_one_config(trained_checkpoint):
    """--backend vllm: the server's flags parse back to the same ServeConfig, so the server's vLLM engine and the
    in-process one are configured alike."""
    from lifecycle.config import add_config_arguments, config_from_args
    from serve.launch import ServeConfig

    cfg = BenchServeConfig(model=str(trained_checkpoint), backend=["native,vllm"], kv_cache_memory_bytes=1 << 26)
    serve_cfg = serve_config_for(cfg, trained_checkpoint, "vllm")
    argv = serve_argv(serve_cfg)
    assert argv[argv.index("--backend") + 1] == "vllm"
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ServeConfig)
    parsed = config_from_args(ServeConfig, parser.parse_args(argv))
    assert parsed == serve_cfg and parsed.vllm_config() == serve_cfg.vllm_config()
