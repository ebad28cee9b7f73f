"""Checkpoint round trip, hash refusal, atomic save, HF loadability, plain-HF input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from lifecycle.checkpoint import MANIFEST_NAME, latest_checkpoint, load_checkpoint, save_checkpoint
from lifecycle.errors import CheckpointError


@pytest.fixture()
def model_and_tokenizer(micro_model_config, tiny_tokenizer_dir):
    from transformers import LlamaForCausalLM

    from lifecycle.tokenizer import load_tokenizer

    torch.manual_seed(0)
    return LlamaForCausalLM(micro_model_config.to_hf()), load_tokenizer(tiny_tokenizer_dir)


def _save(tmp_path, model, tok, name="ckpt", **kw):
    return save_checkpoint(tmp_path / name, model, tok, recipe="test", recipe_config={"lr": 1e-3}, **kw)


def test_round_trip_manifest_and_weights(tmp_path, model_and_tokenizer):
    model, tok = model_and_tokenizer
    ckpt = _save(tmp_path, model, tok, dataset_manifest_hash="abc123", metrics={"eval_loss": 1.5})
    m = ckpt.manifest
    assert m["recipe"] == "test" and m["recipe_config"] == {"lr": 1e-3}
    assert m["dataset_manifest_hash"] == "abc123" and m["lmforge_version"]
    assert "git_revision" in m and m["parent"] is None
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(m["files"])
    assert all(len(v["sha256"]) == 64 for v in m["files"].values())
    loaded = ckpt.load_model()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert ckpt.load_tokenizer().encode("the model") == tok.encode("the model")
    child = _save(tmp_path, model, tok, name="child", parent=ckpt)
    assert child.manifest["parent"]["manifest_sha256"] == ckpt.manifest_sha256()


def test_plain_transformers_loads_our_checkpoint(tmp_path, model_and_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = model_and_tokenizer
    ckpt = _save(tmp_path, model, tok)
    hf = AutoModelForCausalLM.from_pretrained(ckpt.path)
    hf_tok = AutoTokenizer.from_pretrained(ckpt.path)
    ids = torch.tensor([hf_tok.encode("the model reads text")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits)
    gen = json.loads((ckpt.path / "generation_config.json").read_text())
    assert gen["do_sample"] is False if "do_sample" in gen else True


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "delete"])
def test_damaged_file_is_refused_naming_it(tmp_path, model_and_tokenizer, damage):
    model, tok = model_and_tokenizer
    ckpt = _save(tmp_path, model, tok)
    weights = ckpt.path / "model.safetensors"
    if damage == "corrupt":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        with open(weights, "r+b") as fh:
            fh.truncate(weights.stat().st_size // 2)
    else:
        weights.unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(ckpt.path)


def test_files_get_the_umask_mode_not_the_temporary_files_0600(tmp_path, model_and_tokenizer):
    """transformers 5.19 writes model.safetensors through a 0o600 temporary file and mkstemp makes 0o600 files: a
    checkpoint published with those modes could not be read by the serving container's own user (found running
    deploy/Dockerfile with a mounted checkpoint: PermissionError on model.safetensors)."""
    from lifecycle.data.manifest import atomic_write_text

    model, tok = model_and_tokenizer
    old = os.umask(0o022)
    try:
        ckpt = _save(tmp_path, model, tok)
        atomic_write_text(tmp_path / "report.json", "{}")
        os.umask(0o077)  # a private umask is honoured, not widened
        private = _save(tmp_path, model, tok, name="private")
    finally:
        os.umask(old)
    files = [p for p in ckpt.path.rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o644" for p in files}
    assert ckpt.path.stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o644
    assert {p.stat().st_mode & 0o777 for p in private.path.rglob("*") if p.is_file()} == {0o600}
    load_checkpoint(ckpt.path)  # hashes unchanged by the chmod


def test_save_is_atomic_when_interrupted(tmp_path, model_and_tokenizer):
    model, tok = model_and_tokenizer

    def crash(tmp_dir: Path) -> None:
        (tmp_dir / "half-written").write_text("x")
        raise RuntimeError("simulated crash mid-save")

    with pytest.raises(RuntimeError):
        _save(tmp_path, model, tok, write_extra_files=crash)
    assert not (tmp_path / "ckpt").exists()
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone too


def test_overwrite_and_exists(tmp_path, model_and_tokenizer):
    model, tok = model_and_tokenizer
    _save(tmp_path, model, tok)
    with pytest.raises(CheckpointError, match="already exists"):
        _save(tmp_path, model, tok)
    _save(tmp_path, model, tok, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_plain_hf_directory_is_accepted(tmp_path, model_and_tokenizer):
    model, tok = model_and_tokenizer
    plain = tmp_path / "plain"
    model.save_pretrained(plain)
    tok.save_pretrained(plain)
    ckpt = load_checkpoint(plain)
    assert ckpt.manifest is None and ckpt.warnings
    assert ckpt.load_model().config.hidden_size == 64


def test_not_a_checkpoint(tmp_path, model_and_tokenizer):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path / "empty")
    model, tok = model_and_tokenizer
    pickled = tmp_path / "pickled"
    model.save_pretrained(pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(pickled)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="not supported"):
        load_checkpoint(odd)
    bad_manifest = tmp_path / "bad_manifest"
    shutil.copytree(_save(tmp_path, model, tok).path, bad_manifest)
    (bad_manifest / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest.json: not valid JSON"):
        load_checkpoint(bad_manifest)


def test_latest_checkpoint_ignores_incomplete(tmp_path, model_and_tokenizer):
    model, tok = model_and_tokenizer
    run = tmp_path / "run"
    _save(run / "checkpoints", model, tok, name="step-0000002")
    _save(run / "checkpoints", model, tok, name="step-0000010")
    (run / "checkpoints" / "step-0000020").mkdir()  # no manifest: incomplete
    (run / "checkpoints" / ".step-0000030.tmp-1-abc").mkdir()
    assert latest_checkpoint(run).name == "step-0000010"
    assert latest_checkpoint(tmp_path / "nothing") is None
    os.sync()
