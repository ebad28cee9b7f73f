"""Tests of lifecycle/bench.py: a tiny end-to-end `bench pretrain` run, the summary arithmetic, the CLI."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest

from lifecycle.bench import BenchPretrainConfig, RunTiming, add_command, bench_pretrain, summarize
from lifecycle.errors import ConfigError
from lifecycle.tokenizer import save_tokenizer, train_tokenizer

WORDS = ["the", "model", "reads", "a", "long", "document", "and", "writes", "short", "answers", "about",
         "python", "files", "quickly", "every", "day", "with", "care"]


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bench_corpus")
    rng = random.Random(0)
    sentences = [" ".join(rng.choices(WORDS, k=rng.randint(6, 14))).capitalize() + "." for _ in range(400)]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences))
    save_tokenizer(train_tokenizer(sentences, vocab_size=300, show_progress=False), root / "tok")
    return corpus, root / "tok"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge")
    add_command(parser.add_subparsers())
    return parser


def test_bench_pretrain_smoke(tiny_corpus: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus, tok = tiny_corpus
    out = tmp_path / "bench" / "pretrain.json"
    cfg = BenchPretrainConfig(preset="tiny", data=[str(corpus)], tokenizer=str(tok), seq_len=32, micro_batch_size=2,
                              global_batch_size=4, steps=3, warmup_steps=1, output=str(out), plot=True)
    bench_pretrain(cfg)
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"lmforge", "plain_pytorch"}
    for run in report["runs"].values():
        assert run["measured_steps"] == [2, 3]
        assert run["tokens_per_s_median"] > 0 and run["tokens_per_s_mean"] > 0 and run["s_per_step_median"] > 0
    assert report["ratio_tokens_per_s"] > 0
    assert report["machine"]["torch_version"] and report["machine"]["num_cpu_cores"] >= 1
    assert report["command"].startswith("lmforge bench pretrain --preset tiny")
    assert out.with_suffix(".png").stat().st_size > 0
    assert "lmforge / plain tokens/s" in capsys.readouterr().out


def test_summarize_skips_warmup() -> None:
    timing = RunTiming(step_s={1: 10.0, 2: 1.0, 3: 2.0, 4: 4.0}, final_loss=3.0, wall_s=20.0)
    row = summarize(timing, tokens_per_step=100, warmup_steps=1)
    assert row["measured_steps"] == [2, 3, 4]
    assert row["s_per_step_median"] == 2.0
    assert row["tokens_per_s_median"] == 50.0
    assert row["tokens_per_s_mean"] == pytest.approx((100 + 50 + 25) / 3)


def test_cli_help(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["bench", "pretrain", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--warmup-steps" in text and "--micro-batch-size" in text and "example:" in text


def test_cli_rejects_steps_not_above_warmup() -> None:
    args = _parser().parse_args(["bench", "pretrain", "--steps", "2", "--warmup-steps", "2"])
    with pytest.raises(ConfigError, match="--warmup-steps"):
        args.func(args)


def test_config_needs_tokenizer_with_data() -> None:
    with pytest.raises(ConfigError, match="--tokenizer"):
        BenchPretrainConfig(data=["corpus.jsonl"])
