"""The demo's serving leg on the trained tiny checkpoint: a real server on a free port, chat turns, an
evaluation through it (the held-out doc-matching task and perplexity), then a clean shutdown."""

from __future__ import annotations

import json

import grpc
import pytest

from serve.client import Client
from serve.demo import CHAT_TURNS, serve_chat_and_evaluate, write_doc_match_task


def test_doc_match_task_is_well_formed(trained_checkpoint, tmp_path):
    heldout = trained_checkpoint.parents[1] / "corpus" / "heldout.jsonl"
    task = write_doc_match_task(heldout, tmp_path, num_items=30)
    rows = [json.loads(line) for line in (tmp_path / "stdlib_doc_match.jsonl").read_text().splitlines()]
    assert task.is_file() and 0 < len(rows) <= 30
    for row in rows:
        assert len(set(row["choices"])) == 4 and 0 <= row["gold"] < 4


def test_serve_chat_and_evaluate(trained_checkpoint, tmp_path):
    lines: list[str] = []
    heldout = trained_checkpoint.parents[1] / "corpus" / "heldout.jsonl"
    report = serve_chat_and_evaluate(trained_checkpoint, heldout, tmp_path, data_root=tmp_path / "none",
                                     print_fn=lines.append)
    printed = "\n".join(lines)
    for turn in CHAT_TURNS:
        assert f"you> {turn}" in printed
    assert printed.count("assistant> ") == len(CHAT_TURNS) and printed.rstrip().endswith("server stopped")
    tasks = report["tasks"]
    assert tasks["stdlib_doc_match"]["num_items"] > 0 and 0 <= tasks["stdlib_doc_match"]["metrics"]["acc"] <= 1
    assert tasks["heldout_perplexity"]["metrics"]["token_perplexity"] > 1
    address = printed.split(" on ", 1)[1].split(" ", 1)[0]
    with Client(address) as client, pytest.raises(grpc.RpcError):  # the server is gone
        client.model_info(timeout_s=2)
