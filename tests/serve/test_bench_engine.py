"""`lmforge bench engine` smoke run at toy size: every workload and peer writes its numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lifecycle.errors import ConfigError
from serve.bench_engine import BenchEngineConfig, bench_engine


@pytest.fixture(scope="module")
def quantizable_model(trained_checkpoint, tmp_path_factory) -> Path:
    """A random-init tiny Llama whose shapes `rtn:4:32` and the int4 kernels take (hidden 64, intermediate 128:
    multiples of 32), with an untied LM head (so it is quantized as MatMulNBits quantizes it), the trained
    checkpoint's tokenizer, and held-out text beside it (the onnxruntime-int4 export reports perplexity on it)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lifecycle.checkpoint import load_checkpoint, save_checkpoint

    root = tmp_path_factory.mktemp("bench-quant")
    tok = load_checkpoint(trained_checkpoint).load_tokenizer()
    (root / "corpus").mkdir()
    shutil.copy(Path(trained_checkpoint).parent.parent / "corpus" / "heldout.jsonl", root / "corpus" / "heldout.jsonl")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=len(tok), max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    return save_checkpoint(root / "model", LlamaForCausalLM(config), tok, recipe="random-init",
                           recipe_config={"test": "bench quant backends"}).path


def test_bench_engine_smoke(tmp_path, trained_checkpoint):
    out = tmp_path / "engine.json"
    report = bench_engine(BenchEngineConfig(model=str(trained_checkpoint), workloads=["w1", "w2", "w4"],
                                            num_requests=3, prompt_len=16,
                                            output_len=4, latency_output_len=4, prefix_len=64, output=str(out)))
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    res = saved["results"]
    assert res["w1"]["native"]["output_tokens"] == 12 and res["w1"]["transformers"]["output_tokens"] == 12
    # transformers ran after our W1: ours ran again after it, and the row is the mean of the two runs
    runs = res["w1"]["native"]["runs_output_tokens_per_s"]
    assert len(runs) == 2 and res["w1"]["native"]["output_tokens_per_s"] == pytest.approx(sum(runs) / 2)
    assert res["w1"]["native"]["same_tokens_both_runs"] is True
    assert "| W1 | native | " in (tmp_path / "engine.md").read_text() and "(mean of " in (tmp_path / "engine.md").read_text()
    assert res["w1"]["native_over_transformers"] == pytest.approx(
        res["w1"]["native"]["output_tokens_per_s"] / res["w1"]["transformers"]["output_tokens_per_s"])
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
    with pytest.raises(ConfigError, match=r"--backend: unknown \['native-int3'\]; choose from .*native-int4"):
        BenchEngineConfig(backend=["native,native-int3"])


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory) -> Path:
    """$LMFORGE_HOME of this module's tests: the quantized children and ONNX exports are made once for all."""
    return tmp_path_factory.mktemp("bench-cache")


def test_native_int4_refuses_a_model_it_cannot_quantize_before_measuring(trained_checkpoint, tmp_path):
    """The trained test model's intermediate size (176) is not a multiple of 32: one clear error, nothing run."""
    with pytest.raises(ConfigError, match=r"group size 32 does not divide the input dimension 176 of .*config.json"):
        bench_engine(BenchEngineConfig(model=str(trained_checkpoint), workloads=["w2"], peers=["none"],
                                       backend=["native-int4"], output=str(tmp_path / "e.json")), cache_dir=tmp_path)
    assert not (tmp_path / "e.json").exists() and not (tmp_path / "bench").exists()


def test_native_int4_int8_run_next_to_onnxruntime_int4(tmp_path, quantizable_model, bench_cache, capsys):
    """native-int4 / native-int8 quantize the bench model once (cached), run W1 and W2 in the same invocation as
    onnxruntime-int4, with greedy agreement against the fp32 native run and the int4 ratio in JSON and table."""
    from lifecycle.checkpoint import load_checkpoint
    from serve.backends.native_quant_bench import quantize_for_bench

    cache = bench_cache
    out = tmp_path / "engine.json"
    report = bench_engine(BenchEngineConfig(model=str(quantizable_model), workloads=["w1", "w2"], peers=["none"],
                                            backend=["native-int4,native-int8", "onnxruntime-int4"], num_requests=3,
                                            prompt_len=16, output_len=4, latency_output_len=6, plot=False,
                                            output=str(out)), cache_dir=cache)
    res = json.loads(out.read_text())["results"]
    assert res == json.loads(json.dumps(report["results"]))
    for workload, tokens, key in (("w1", 12, "output_tokens_per_s"), ("w2", 6, "decode_tokens_per_s")):
        for backend in ("native-int4", "native-int8", "onnxruntime-int4"):
            row = res[workload][backend]
            assert row["output_tokens"] == tokens and row[key] > 0
            agreement = row["greedy_agreement"]  # against the fp32 native run of the same prompts
            assert 0 <= agreement["prefix_fraction"] <= 1 and 0 <= agreement["identical_fraction"] <= 1
        ratio = res[workload]["native-int4_over_onnxruntime-int4"]
        assert ratio == pytest.approx(res[workload]["native-int4"][key] / res[workload]["onnxruntime-int4"][key])
    int4, int8 = res["w2"]["native-int4"], res["w2"]["native-int8"]
    assert int4["method"] == "rtn:4:32" and int4["group_size"] == 32 and int4["lm_head"] == "quantized"
    assert "int4" in int4["kernel_path"] and "int8" in int8["kernel_path"]
    quant = load_checkpoint(int4["checkpoint"]).quantization
    assert (quant["method"], quant["bits"], quant["group_size"], quant["sym"]) == ("rtn", 4, 32, True)
    printed = capsys.readouterr().out
    assert "| W2 | native-int4 | onnxruntime-int4 |" in printed and "| W1 | native-int8 |" in printed
    # made once: the cached child is returned as it is
    manifest = Path(int4["checkpoint"]) / "manifest.json"
    before = manifest.stat().st_mtime_ns
    assert quantize_for_bench(quantizable_model, cache, "rtn:4:32") == Path(int4["checkpoint"])
    assert manifest.stat().st_mtime_ns == before



def test_cpu_time_ab_of_native_int4_and_onnxruntime_int4(quantizable_model, bench_cache):
    """The single-thread CPU-time A/B behind the ONNX section's table (python -m serve.backends.onnxruntime_cpu_time)."""
    import torch

    from serve.backends.onnxruntime_cpu_time import bench, main, markdown

    threads = torch.get_num_threads()
    result = bench(["native-int4", "onnxruntime-int4"], quantizable_model, bench_cache, prompt=[5, 6, 7, 8, 9],
                   num_tokens=5, rounds=2)
    assert torch.get_num_threads() == threads  # restored after the one-thread rounds
    rows = result["rows"]
    assert [r["engine"] for r in rows] == ["native-int4", "onnxruntime-int4"] and rows[0]["vs_first"] == 1.0
    for row in rows:
        assert len(row["rounds_cpu_s"]) == 2 and row["tokens_per_cpu_s"] > 0 and row["same_tokens_every_round"]
    assert "int4" in rows[0]["runs"] and "onnxruntime batched runner" in rows[1]["runs"]
    assert "| onnxruntime-int4 |" in markdown(result)
    with pytest.raises(ConfigError, match="--engines: unknown"):
        main(["--engines", "native-int3"])