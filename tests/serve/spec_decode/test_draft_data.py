"""The draft's training text from its target (lifecycle/recipes/draft_data.py): prompt windows and the
continuations, which must be the target's greedy output token for token."""

from __future__ import annotations

import json

import pytest
import torch

from lifecycle.errors import ConfigError
from lifecycle.recipes.draft_data import continuations_target_sha, sample_prompts


def test_prompt_windows_come_from_distinct_documents_and_respect_the_lengths():
    docs = [list(range(100 * i, 100 * i + n)) for i, n in enumerate([3, 10, 40, 90, 7, 64])]
    prompts = sample_prompts(docs, 10, min_len=8, max_len=32, seed=1)
    assert len(prompts) == 4  # documents of 3 and 7 tokens are too short
    for p in prompts:
        assert 8 <= len(p) <= 32
        doc = docs[p[0] // 100]
        start = doc.index(p[0])
        assert doc[start:start + len(p)] == p  # a contiguous window of one document
    assert len({p[0] // 100 for p in prompts}) == 4
    assert sample_prompts(docs, 10, min_len=8, max_len=32, seed=1) == prompts  # seeded
    with pytest.raises(ConfigError, match="min_len"):
        sample_prompts(docs, 2, min_len=0)


def test_continuations_are_the_targets_greedy_output(trained_checkpoint, tmp_path):
    from lifecycle.checkpoint import load_checkpoint
    from lifecycle.recipes.draft_data import write_target_continuations

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"def function_{i}(x):\n    return x + {i} * x\n" * 3}) + "\n"
                              for i in range(12)))
    out = write_target_continuations(trained_checkpoint, corpus, tmp_path / "c" / "cont.jsonl", num_prompts=5,
                                     max_new_tokens=10)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    ckpt = load_checkpoint(trained_checkpoint)
    assert len(records) == 5 and continuations_target_sha(out) == ckpt.manifest_sha256()
    tok, model = ckpt.load_tokenizer(), ckpt.load_model()
    for rec in records:
        ids, n = rec["token_ids"], rec["prompt_tokens"]
        assert 8 <= n and len(ids) == n + 10 and rec["text"] == tok.decode(ids)
        context = list(ids[:n])
        with torch.no_grad():
            for _ in range(10):  # plain greedy with transformers, EOS not special (the engine ignores it)
                context.append(int(model(input_ids=torch.tensor([context])).logits[0, -1].argmax()))
        assert context == ids
    with pytest.raises(ConfigError, match="positive"):
        write_target_continuations(trained_checkpoint, corpus, tmp_path / "x.jsonl", num_prompts=0)


def test_cli_refuses_bad_flags_naming_them(trained_checkpoint, tmp_path, capsys):
    from lifecycle.cli import main

    out = tmp_path / "cont.jsonl"
    assert main(["draft-data", "--target", str(trained_checkpoint), "--data", str(tmp_path / "missing.jsonl"),
                 "-o", str(out)]) != 0
    assert "missing.jsonl" in capsys.readouterr().err
    assert main(["draft-data", "--target", str(trained_checkpoint), "--data", str(tmp_path / "missing.jsonl"),
                 "-o", str(out), "--max-new-tokens", "0"]) != 0
    assert "max_new_tokens" in capsys.readouterr().err and not out.exists()
    assert main(["draft-data", "--target", str(trained_checkpoint), "--data", str(tmp_path / "missing.jsonl"),
                 "-o", str(tmp_path)]) == 2  # a directory: refused before any generation
    assert f"--output {tmp_path}: is a directory" in capsys.readouterr().err
