"""quant.cpu_time_bench: our engine's CPU-time decode rounds, the per-linear profile, and onnxruntime-genai exports
timed in their own worker (runs when `make peers` has built .venv-peers, or LMFORGE_PEERS_PYTHON names one)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from quant.cpu_time_bench import REPO_ROOT, bench, main

PROMPT = [5, 6, 7, 8, 9, 10]


def _peers_python() -> Path | None:
    for cand in (os.environ.get("LMFORGE_PEERS_PYTHON"), REPO_ROOT / ".venv-peers/bin/python"):
        if cand and Path(cand).is_file():
            return Path(cand)
    return None


def test_profile_splits_a_quantized_decode_into_its_linears(tiny_checkpoint, quantized):
    child = quantized("rtn:4:32", quantize_lm_head=True)
    result = bench([str(tiny_checkpoint), str(child)], prompt=PROMPT, num_tokens=6, rounds=2, profile=True)
    parent, quant = result["rows"]
    assert parent["profile_cpu_ms_per_token"] is None  # fp32: one C call per step, nothing to split
    prof = quant["profile_cpu_ms_per_token"]
    assert set(prof) == {"qkv", "o", "gate_up", "down", "lm_head", "rest", "all"}
    assert all(prof[k] > 0 for k in ("qkv", "o", "gate_up", "down", "lm_head", "all"))
    assert sum(v for k, v in prof.items() if k != "all") == pytest.approx(prof["all"])
    assert quant["same_tokens_every_round"] and len(quant["rounds_cpu_s"]) == 2


def test_bad_ort_genai_dir_is_one_line_error(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit, match="not an onnxruntime-genai export"):
        main([str(tiny_checkpoint), "--tokens", "3", "--rounds", "1", "--ort-genai", str(tmp_path)])


def test_ort_genai_int4_export_timed_in_its_worker(tiny_checkpoint, tmp_path):
    python = _peers_python()
    if python is None:
        pytest.skip("no peers environment (make peers, or LMFORGE_PEERS_PYTHON)")
    out = tmp_path / "ort-int4"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | {"HF_HUB_OFFLINE": "1"}
    subprocess.run([str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(tiny_checkpoint), "-o", str(out),
                    "-p", "int4", "-e", "cpu", "-c", str(tmp_path / "cache")], check=True, capture_output=True,
                   env=env, timeout=900)
    result = bench([str(tiny_checkpoint)], prompt=PROMPT, num_tokens=6, rounds=2, ort_genai=[str(out)],
                   peers_python=str(python))
    row = result["rows"][1]
    assert row["model"] == f"ort-genai:{out}" and "onnxruntime-genai" in row["engine_path"]
    assert row["tokens_per_cpu_s"] > 0 and len(row["rounds_cpu_s"]) == 2 and row["same_tokens_every_round"]
    # A trained model picks its EOS/pad id now and then; onnxruntime-genai would end the round there (fewer tokens in
    # less time: a faster-looking row). Make the first greedy token the EOS and pad id: still every token decoded.
    import json

    from quant.cpu_time_bench import OrtGenaiWorker

    worker = OrtGenaiWorker(str(out), str(python))
    try:
        first = worker.decode(PROMPT, 2)[1][0]
    finally:
        worker.close()
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"] |= {"eos_token_id": [first], "pad_token_id": first}
    cfg_path.write_text(json.dumps(cfg))
    result = bench([str(tiny_checkpoint)], prompt=PROMPT, num_tokens=6, rounds=1, ort_genai=[str(out)],
                   peers_python=str(python))  # raises if a round decodes fewer than 6 tokens
    assert result["rows"][1]["tokens_per_cpu_s"] > 0
