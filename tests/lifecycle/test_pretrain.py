"""Pretraining: exact resume (stop and SIGKILL), the same curve under torchrun with 2 processes,
continued pretraining, and the artefacts a person looks at."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lifecycle.checkpoint import load_checkpoint
from lifecycle.errors import ConfigError, DataError
from lifecycle.recipes.pretrain import PretrainConfig, block_indices, pretrain

REPO = Path(__file__).resolve().parents[2]


def _cfg(tmp_path, corpus, tok, model_yaml, name="run", **kw) -> PretrainConfig:
    base = dict(data=[str(corpus)], tokenizer=str(tok), model_config=str(model_yaml), preset="tiny",
                output_dir=str(tmp_path / name), seq_len=32, micro_batch_size=4, global_batch_size=8,
                max_steps=8, warmup_steps=1, save_every=4, eval_every=4, log_every=1, eval_fraction=0.1,
                progress=False)
    base.update(kw)
    return PretrainConfig(**base)


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def _cli_args(cfg: PretrainConfig) -> list[str]:
    args = ["pretrain", "--data", *cfg.data, "--tokenizer", cfg.tokenizer, "--model-config", cfg.model_config,
            "--output-dir", cfg.output_dir, "--no-progress"]
    for name in ("seq_len", "micro_batch_size", "global_batch_size", "max_steps", "warmup_steps", "save_every",
                 "eval_every", "log_every"):
        args += [f"--{name.replace('_', '-')}", str(getattr(cfg, name))]
    return args + ["--eval-fraction", str(cfg.eval_fraction)]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml):
    """An uninterrupted 8-step run: the curve every other run must reproduce."""
    tmp = tmp_path_factory.mktemp("ref")
    final = pretrain(_cfg(tmp, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml))
    return tmp / "run", final


def test_artifacts(reference_run):
    run, final = reference_run
    ckpt = load_checkpoint(final)
    m = ckpt.manifest
    assert m["recipe"] == "pretrain" and m["recipe_config"]["max_steps"] == 8
    assert m["dataset_manifest_hash"] and m["metrics"]["eval_loss"] > 0 and m["metrics"]["eval_ppl"] > 1
    assert (run / "loss_curve.png").stat().st_size > 1000
    steps = [s for s, _ in _losses(run)]
    assert steps == list(range(1, 9))
    losses = [loss for _, loss in _losses(run)]
    assert losses[-1] < losses[0]  # it learns
    assert len(list((run / "checkpoints").iterdir())) == 2  # keep_last
    assert "trainer_state/optimizer.safetensors" in load_checkpoint(run / "checkpoints" / "step-0000008").manifest["files"]


def test_resume_after_stop_is_exact(tmp_path, reference_run, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml):
    cfg = _cfg(tmp_path, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml, save_every=3)
    pretrain(_cfg(tmp_path, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml, save_every=3, stop_at_step=5))
    assert not (tmp_path / "run" / "final").exists()
    pretrain(cfg)
    ref = dict(_losses(reference_run[0]))
    got = dict(_losses(tmp_path / "run"))
    assert got.keys() == ref.keys()
    for step in ref:  # CPU kernels are deterministic: the same numbers, within float tolerance
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step


def test_resume_after_sigkill(tmp_path, reference_run, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml):
    """Kill -9 the real CLI mid-run, rerun the same command: the curve continues where it stopped."""
    cfg = _cfg(tmp_path, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml, max_steps=40, save_every=2,
               eval_every=0)
    cmd = [sys.executable, "-m", "lifecycle", *_cli_args(cfg)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ckpts = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not any((p / "manifest.json").exists() for p in ckpts.glob("step-*")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "final").exists(), "the run finished before it could be killed"
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resuming" in out.stdout
    uninterrupted = pretrain(_cfg(tmp_path, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml, name="ref40",
                                  max_steps=40, save_every=2, eval_every=0))
    ref = dict(_losses(uninterrupted.parent))
    got = dict(_losses(tmp_path / "run"))
    assert sorted(got) == list(range(1, 41))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step


def test_two_processes_same_curve(tmp_path, reference_run, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml):
    """torchrun --nproc_per_node 2 (gloo on CPU) with the same global batch gives the same losses."""
    cfg = _cfg(tmp_path, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml, micro_batch_size=2)
    torchrun = Path(sys.executable).with_name("torchrun")
    # CPU processes over gloo even on a GPU box (one GPU cannot host two ranks).
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "lifecycle",
                          *_cli_args(cfg)], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "run" / "final")
    assert ckpt.manifest["extra"]["world_size"] == 2
    ref = dict(_losses(reference_run[0]))
    got = dict(_losses(tmp_path / "run"))
    assert got.keys() == ref.keys()  # one writer: rank 0
    for step in ref:  # gradients are summed in another order: float tolerance, not bit equality
        assert got[step] == pytest.approx(ref[step], rel=1e-4), step


def test_continued_pretraining(tmp_path, reference_run, tiny_corpus):
    _, final = reference_run
    cont = pretrain(PretrainConfig(data=[str(tiny_corpus)], init_from=str(final), output_dir=str(tmp_path / "c"),
                                   seq_len=32, micro_batch_size=4, global_batch_size=8, max_steps=3,
                                   warmup_steps=0, save_every=0, eval_every=0, progress=False))
    ckpt = load_checkpoint(cont)
    assert ckpt.manifest["parent"]["manifest_sha256"] == load_checkpoint(final).manifest_sha256()
    first_loss = _losses(tmp_path / "c")[0][1]
    assert first_loss < _losses(reference_run[0])[0][1]  # starts from the trained weights, not from scratch


def test_changed_settings_refuse_to_resume(tmp_path, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml):
    pretrain(_cfg(tmp_path, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml, max_steps=4, save_every=2,
                  stop_at_step=2))
    with pytest.raises(ConfigError, match="learning_rate"):
        pretrain(_cfg(tmp_path, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml, max_steps=4, save_every=2,
                      learning_rate=0.5))


def test_block_order_is_a_pure_function_of_position():
    a = [block_indices(s, 10, 4, seed=3) for s in range(6)]
    b = [block_indices(s, 10, 4, seed=3) for s in range(6)]
    assert all((x == y).all() for x, y in zip(a, b))
    flat = [int(i) for x in a for i in x]
    assert sorted(flat[:10]) == list(range(10))  # each epoch is a permutation
    assert sorted(flat[10:20]) == list(range(10))


@pytest.mark.parametrize("kw,match", [
    ({"global_batch_size": 6}, "not a multiple of --micro-batch-size"),
    ({"warmup_steps": 8}, "--warmup-steps"),
    ({"seq_len": 0}, "--seq-len must be positive"),
    ({"data": []}, "--data"),
])
def test_bad_config(tmp_path, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml, kw, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(tmp_path, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml, **kw)


def test_output_dir_that_is_a_file_or_the_init_checkpoint(tmp_path, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml):
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        _cfg(tmp_path, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml, output_dir=str(tiny_corpus))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    with pytest.raises(ConfigError, match="is the checkpoint this command reads"):
        _cfg(tmp_path, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml, output_dir=str(ckpt), init_from=str(ckpt))


def test_bad_data(tmp_path, tiny_tokenizer_dir, micro_model_yaml):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        pretrain(_cfg(tmp_path, empty, tiny_tokenizer_dir, micro_model_yaml))
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "too short"}\n')
    with pytest.raises(DataError, match="shorter than one sequence"):
        pretrain(_cfg(tmp_path, short, tiny_tokenizer_dir, micro_model_yaml, name="r2", eval_fraction=0.0))
    with pytest.raises(DataError, match="missing.jsonl"):
        pretrain(_cfg(tmp_path, tmp_path / "missing.jsonl", tiny_tokenizer_dir, micro_model_yaml, name="r3"))


def test_bf16_autocast_runs_and_tracks_fp32(tmp_path, reference_run, tiny_corpus, tiny_tokenizer_dir,
                                            micro_model_yaml):
    """Mixed precision where asked (CPU supports bf16 autocast): the same curve within bf16 tolerance,
    and fp32 then bf16 in one process (accelerate's singleton state is reset between runs)."""
    final = pretrain(_cfg(tmp_path, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml, save_every=0,
                          precision="bf16"))
    assert load_checkpoint(final).manifest["extra"]["precision"] == "bf16"
    ref = dict(_losses(reference_run[0]))
    for step, loss in _losses(tmp_path / "run"):
        assert loss == pytest.approx(ref[step], rel=2e-2), step


def test_weighted_sources_are_mixed_by_share_and_recorded(tmp_path, tiny_corpus, tiny_tokenizer_dir):
    """Continued pretraining on domain.jsonl:0.2,general:0.8: documents drawn by weight (seeded), the mix in the
    dataset manifest; unweighted --data reads every file whole, as before."""
    from lifecycle.recipes.pretrain import prepare_data
    from lifecycle.tokenizer import load_tokenizer

    domain = tmp_path / "domain.jsonl"
    domain.write_text("".join(json.dumps({"text": f"python reads the file {i} and the model writes it"}) + "\n"
                              for i in range(100)))
    tok = load_tokenizer(tiny_tokenizer_dir)

    def prepared(data, name, seed=0):
        cfg = PretrainConfig(data=data, tokenizer=str(tiny_tokenizer_dir), seq_len=16, eval_fraction=0.0,
                             max_steps=2, warmup_steps=0, seed=seed)
        return prepare_data(cfg, tok, "tok", tmp_path / name)

    mixed = prepared([f"{domain}:0.2,{tiny_corpus}:0.8"], "mixed")
    mix = mixed.manifest["extra"]["mix"]
    general_docs = sum(1 for _ in open(tiny_corpus))
    assert [m["source"] for m in mix] == [str(domain), str(tiny_corpus)]
    # the largest mix no source repeats for: all 300 general documents, and 75 domain ones (20% of 375)
    assert [m["documents_used"] for m in mix] == [75, general_docs] and mix[0]["documents_available"] == 100
    assert sum(m["tokens_used"] for m in mix) == mixed.manifest["num_tokens"]
    assert 0 < mix[0]["token_share"] < 0.2  # domain documents are shorter than the general ones
    again, other_seed = prepared([f"{domain}:0.2,{tiny_corpus}:0.8"], "again"), \
        prepared([f"{domain}:0.2,{tiny_corpus}:0.8"], "seed1", seed=1)
    assert (again.train == mixed.train).all() and not (other_seed.train.shape == mixed.train.shape
                                                       and (other_seed.train == mixed.train).all())
    plain = prepared([str(domain), str(tiny_corpus)], "plain")
    assert "mix" not in plain.manifest["extra"] and plain.manifest["extra"]["train_documents"] == 100 + general_docs
    with pytest.raises(ConfigError, match="weight"):
        prepared([f"{domain}:0.2,{tiny_corpus}:-1"], "bad")
