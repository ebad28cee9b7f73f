"""The embedded default end to end at toy size: stdlib corpus -> tokenizer -> target + draft, then cached."""

from __future__ import annotations

import json

from lifecycle.checkpoint import load_checkpoint
from lifecycle.demo import DemoConfig, build_demo


def test_demo_pipeline_and_cache(tmp_path, capsys):
    cfg = DemoConfig(vocab_size=512, seq_len=32, target_preset="tiny", target_steps=2, draft_steps=2,
                     micro_batch_size=2, global_batch_size=2, draft_continuations=6, draft_continuation_tokens=12)
    art = build_demo(tmp_path, cfg, progress=False)
    target, draft = load_checkpoint(art.target), load_checkpoint(art.draft)
    assert target.load_tokenizer().get_vocab() == draft.load_tokenizer().get_vocab()  # speculative decoding needs it
    assert target.manifest["recipe"] == "pretrain" and target.manifest["dataset_manifest_hash"]
    distilled_from = draft.manifest["extra"]["distilled_from"]
    assert distilled_from["manifest_sha256"] == target.manifest_sha256()
    assert distilled_from["temperature"] == cfg.draft_distill_temperature
    assert (art.target.parent / "loss_curve.png").is_file()
    # the draft distils on the corpus and on the target's own greedy continuations, half and half
    lines = [json.loads(line) for line in (art.root / "draft-data" / "continuations.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and {line["target_manifest_sha256"] for line in lines} == {target.manifest_sha256()}
    mix = json.dumps(draft.manifest)
    assert "continuations.jsonl" in mix and "train.jsonl" in mix
    capsys.readouterr()
    again = build_demo(tmp_path, cfg, progress=False)
    out = capsys.readouterr().out
    assert again.target == art.target
    assert "checkpoint cached" in out and "pretraining" not in out and "tokenizer" not in out.split("cached")[0]


def test_draft_of_a_rebuilt_target_is_retrained(tmp_path, capsys):
    import shutil

    cfg = DemoConfig(vocab_size=512, seq_len=32, target_preset="tiny", target_steps=2, draft_steps=2,
                     micro_batch_size=2, global_batch_size=2, draft_continuations=6, draft_continuation_tokens=12)
    art = build_demo(tmp_path, cfg, progress=False)
    shutil.rmtree(art.target.parent)  # the target is rebuilt (its manifest gets a new timestamp and hash)
    capsys.readouterr()
    build_demo(tmp_path, cfg, progress=False)
    out = capsys.readouterr().out
    assert "distilled from another build of the target" in out and "distilling the draft" in out
    assert "greedy continuations" in out  # the draft's data came from the old target: generated again
    target, draft = load_checkpoint(art.target), load_checkpoint(art.draft)
    assert draft.manifest["extra"]["distilled_from"]["manifest_sha256"] == target.manifest_sha256()
