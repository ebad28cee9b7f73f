"""Calibration and held-out text come from the checkpoint's own training data, whether `lmforge pretrain` read
plain files or weighted sources (`--data a.jsonl:0.3,b.jsonl:0.7` is recorded as written)."""

from __future__ import annotations

import json

from lifecycle.checkpoint import Checkpoint
from quant.calibration import heldout_texts, training_texts


def _checkpoint(tmp_path, data, eval_data=()):
    return Checkpoint(path=tmp_path, config={}, manifest={"recipe": "pretrain", "recipe_config": {
        "data": data, "eval_data": list(eval_data), "text_field": "text", "eval_fraction": 0.0}})


def test_weighted_sources_are_read_as_their_files(tmp_path):
    for name, texts in (("a.jsonl", ["alpha one", "alpha two"]), ("b.jsonl", ["beta"]), ("h.jsonl", ["held"])):
        (tmp_path / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    a, b, h = (str(tmp_path / n) for n in ("a.jsonl", "b.jsonl", "h.jsonl"))
    plain = _checkpoint(tmp_path, [a, b], [h])
    weighted = _checkpoint(tmp_path, [f"{a}:0.3,{b}:0.7"], [h])
    assert training_texts(weighted) == training_texts(plain) == ["alpha one", "alpha two", "beta"]
    assert heldout_texts(weighted) == ["held"]
