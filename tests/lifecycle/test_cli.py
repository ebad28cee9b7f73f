"""The console command: help for every subcommand, and one clear line (no traceback) for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lifecycle.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]


def _subcommands(parser) -> dict:
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _leaves(parser, prefix=()):
    subs = _subcommands(parser)
    if not subs:
        yield prefix, parser
    for name, child in subs.items():
        yield prefix + (name,), child
        yield from _leaves(child, prefix + (name,))


def test_top_level_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("demo", "tokenizer", "pretrain", "plan", "checkpoint", "bench"):
        assert name in out


def test_every_subcommand_help_has_an_example():
    for path, parser in _leaves(build_parser()):
        if path:
            assert "example" in parser.format_help(), " ".join(path)


@pytest.mark.parametrize("package", ["lifecycle", "quant", "serve"])
def test_python_dash_m(package):
    out = subprocess.run([sys.executable, "-m", package, "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lifecycle", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _assert_one_line_error(out: subprocess.CompletedProcess, *needles: str) -> None:
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, out.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_bad_inputs_give_one_clear_line(tmp_path, tiny_corpus, tiny_tokenizer_dir):
    missing = tmp_path / "nope.jsonl"
    _assert_one_line_error(_run("pretrain", "--data", str(missing), "--tokenizer", str(tiny_tokenizer_dir),
                                "--output-dir", str(tmp_path / "r1")), "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _assert_one_line_error(_run("pretrain", "--data", str(empty), "--tokenizer", str(tiny_tokenizer_dir),
                                "--output-dir", str(tmp_path / "r2")), "empty")
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"body": "text under another field"}\n')
    _assert_one_line_error(_run("pretrain", "--data", str(wrong), "--tokenizer", str(tiny_tokenizer_dir),
                                "--output-dir", str(tmp_path / "r3")), "empty")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("seq_len: 64\nlearning_rat: 0.1\n")
    _assert_one_line_error(_run("pretrain", "--config", str(cfg), "--data", str(tiny_corpus)),
                           "cfg.yaml", "learning_rat")
    cfg.write_text("seq_len: sixty\n")
    _assert_one_line_error(_run("pretrain", "--config", str(cfg), "--data", str(tiny_corpus)), "seq_len")
    model = tmp_path / "model.yaml"
    model.write_text("hidden_size: 500\n")
    _assert_one_line_error(_run("pretrain", "--data", str(tiny_corpus), "--tokenizer", str(tiny_tokenizer_dir),
                                "--model-config", str(model), "--output-dir", str(tmp_path / "r4")),
                           "model.yaml", "does not divide hidden_size")
    _assert_one_line_error(_run("checkpoint", "verify", str(tmp_path)), "config.json is missing")
    _assert_one_line_error(_run("pretrain", "--data", str(tiny_corpus), "--init-from", str(tmp_path / "x"),
                                "--output-dir", str(tmp_path / "r5")), "no such checkpoint")
    _assert_one_line_error(_run("tokenizer", "train", str(empty), "-o", str(tmp_path / "tok")), "empty")


def test_debug_shows_traceback(tmp_path):
    out = _run("--debug", "checkpoint", "verify", str(tmp_path))
    assert out.returncode != 0 and "Traceback" in out.stderr


@pytest.mark.parametrize("action", ["pretrain", "curate", "engine", "serve", "draft", "sft", "dpo"])
def test_bench_output_naming_a_directory_is_refused_before_any_work(action, tmp_path, capsys):
    """A bench writes its report at the end, after minutes to hours of work: a directory there is refused first."""
    assert main(["bench", action, "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"--output {tmp_path}: is a directory" in err
    assert list(tmp_path.iterdir()) == []
