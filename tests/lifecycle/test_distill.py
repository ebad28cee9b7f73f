"""Distillation: the loss against a float64 reference, exact resume with a teacher, the teacher in the
manifest, and refusal of a teacher with another tokenizer or vocabulary."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from lifecycle.checkpoint import load_checkpoint
from lifecycle.errors import ConfigError
from lifecycle.recipes.distill import kd_loss, mix_losses
from lifecycle.recipes.pretrain import PretrainConfig, pretrain

from .test_pretrain import _cfg, _losses


def _reference_kd(student, teacher, temperature: float) -> float:
    """Brute force in float64: T^2 * mean over positions of sum_x p(x) (log p(x) - log q(x))."""
    s = student.double().reshape(-1, student.shape[-1]).tolist()
    t = teacher.double().reshape(-1, teacher.shape[-1]).tolist()
    total = 0.0
    for zs, zt in zip(s, t):
        ls = math.log(sum(math.exp(z / temperature) for z in zs))
        lt = math.log(sum(math.exp(z / temperature) for z in zt))
        for a, b in zip(zs, zt):
            log_q, log_p = a / temperature - ls, b / temperature - lt
            total += math.exp(log_p) * (log_p - log_q)
    return temperature**2 * total / len(s)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_kd_loss_matches_float64_reference(temperature):
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 11, generator=gen) * 3  # (batch, seq, vocab)
    teacher = torch.randn(2, 5, 11, generator=gen) * 3
    got = float(kd_loss(student, teacher, temperature))
    assert got == pytest.approx(_reference_kd(student, teacher, temperature), rel=1e-5)
    assert float(kd_loss(teacher, teacher, temperature)) == pytest.approx(0.0, abs=1e-6)  # KL(p || p) = 0


def test_kd_loss_gradient_is_softened_difference():
    """d/dz_s of T^2 KL = T (q - p) per position (Hinton et al. 2015, eq. 2), divided by the position count."""
    student = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 7, dtype=torch.float64)
    temperature = 2.0
    kd_loss(student, teacher, temperature).backward()
    q, p = torch.softmax(student.detach() / temperature, -1), torch.softmax(teacher / temperature, -1)
    torch.testing.assert_close(student.grad, temperature * (q - p) / 3)


def test_mix_losses():
    ce, kd = torch.tensor(2.0), torch.tensor(4.0)
    assert float(mix_losses(ce, kd, 0.0)) == 4.0
    assert float(mix_losses(ce, kd, 1.0)) == 2.0
    assert float(mix_losses(ce, kd, 0.25)) == pytest.approx(0.25 * 2 + 0.75 * 4)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml):
    tmp = tmp_path_factory.mktemp("teacher")
    return pretrain(_cfg(tmp, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml, max_steps=6, save_every=0,
                         eval_every=0))


def _student(tmp_path, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml, teacher, **kw) -> PretrainConfig:
    base = dict(distill_from=str(teacher), distill_temperature=2.0, distill_alpha=0.25, max_steps=6,
                save_every=2, eval_every=3, seed=1)
    return _cfg(tmp_path, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml, **(base | kw))


def test_distill_resume_is_exact_and_manifest_names_teacher(tmp_path, teacher_ckpt, tiny_corpus, tiny_tokenizer_dir,
                                                              micro_model_yaml):
    ref = pretrain(_student(tmp_path, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml, teacher_ckpt, name="ref"))
    pretrain(_student(tmp_path, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml, teacher_ckpt, stop_at_step=3))
    pretrain(_student(tmp_path, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml, teacher_ckpt))
    want, got = dict(_losses(ref.parent)), dict(_losses(tmp_path / "run"))
    assert got.keys() == want.keys() == set(range(1, 7))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step
    manifest = load_checkpoint(ref).manifest
    teacher = load_checkpoint(teacher_ckpt)
    entry = manifest["extra"]["distilled_from"]
    assert entry["manifest_sha256"] == teacher.manifest_sha256() and entry["path"] == str(teacher_ckpt.resolve())
    assert (entry["temperature"], entry["alpha"]) == (2.0, 0.25)
    assert manifest["extra"]["schedule_key"]["distill_from"] == str(teacher_ckpt)
    step_manifest = load_checkpoint(ref.parent / "checkpoints" / "step-0000006").manifest
    assert step_manifest["extra"]["distilled_from"] == entry


def test_distillation_pulls_the_student_towards_the_teacher(tmp_path, teacher_ckpt, tiny_corpus, tiny_tokenizer_dir,
                                                             micro_model_yaml):
    """Pure KD (alpha 0, T 1): the logged loss is the KL to the teacher, and it falls."""
    pretrain(_student(tmp_path, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml, teacher_ckpt, distill_alpha=0.0,
                      distill_temperature=1.0, max_steps=8, save_every=0, eval_every=0))
    losses = [loss for _, loss in _losses(tmp_path / "run")]
    assert losses[-1] < 0.7 * losses[0]


def test_teacher_swapped_between_stop_and_resume_is_refused(tmp_path, teacher_ckpt, tiny_corpus, tiny_tokenizer_dir,
                                                            micro_model_yaml):
    other = tmp_path / "other-teacher"
    pretrain(_cfg(tmp_path, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml, name="t2", max_steps=2,
                  save_every=0, eval_every=0, seed=5))
    shutil.copytree(tmp_path / "t2" / "final", other)
    pretrain(_student(tmp_path, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml, teacher_ckpt, stop_at_step=2,
                      distill_from=str(other)))
    shutil.rmtree(other)
    shutil.copytree(teacher_ckpt, other)  # same path, different teacher
    with pytest.raises(ConfigError, match="distilled from a teacher"):
        pretrain(_student(tmp_path, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml, teacher_ckpt,
                          distill_from=str(other)))


def test_teacher_with_another_tokenizer_is_refused(tmp_path, teacher_ckpt, tiny_corpus, tiny_tokenizer_dir,
                                                   micro_model_yaml):
    other_tok = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer_dir, other_tok)
    data = json.loads((other_tok / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[-2:]  # same size, two ids swapped: a different tokenizer
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other_tok / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"--distill-from .*tokenizer"):
        pretrain(_student(tmp_path, tiny_corpus, other_tok, micro_model_yaml, teacher_ckpt))


def test_teacher_with_another_vocab_size_is_refused(tmp_path, teacher_ckpt, tiny_corpus, tiny_tokenizer_dir,
                                                    micro_model_yaml):
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_ckpt, teacher)
    config = json.loads((teacher / "config.json").read_text())
    config["vocab_size"] = 512
    (teacher / "config.json").write_text(json.dumps(config))
    (teacher / "manifest.json").unlink()  # a plain transformers directory: no hashes to break
    with pytest.raises(ConfigError, match=r"teacher vocab_size 512 differs from the student.s vocab_size \d+"):
        pretrain(_student(tmp_path, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml, teacher))


@pytest.mark.parametrize("kw,match", [({"distill_temperature": 0.0}, "--distill-temperature"),
                                      ({"distill_alpha": 1.5}, "--distill-alpha")])
def test_bad_distill_config(tmp_path, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml, kw, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(tmp_path, tiny_corpus, tiny_tokenizer_dir, micro_model_yaml, distill_from="x", **kw)
