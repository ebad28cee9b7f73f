"""The demo's last leg: serve the demo checkpoint, chat with it for a few turns, evaluate it, shut down.

Everything goes through the real stack — a gRPC server on a free loopback port (in this process, on its
own event loop thread, as `lmforge serve` runs it), the chat session of `lmforge chat`, the runner of
`lmforge eval` — so `make demo` exercises what users run. Evaluation tasks:

- stdlib_doc_match (always): 4-way multiple choice built from the demo's held-out documentation (never
  trained on): after a function's signature, which of four summaries is its own? Chance is 25%.
- heldout_perplexity (always): rolling log-likelihood of held-out documents.
- arc_easy (when the shared datasets are found: --data-root, $LMFORGE_DATA_ROOT, or ../shared/data beside
  the checkout): the first items of ARC-Easy, as lm-evaluation-harness scores them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

CHAT_TURNS = ("What does os.path.join do?", "And how is it different from os.path.split?")
NUM_EVAL_ITEMS = 24  # per task: keeps this leg to well under a minute on 2 CPU cores
SHARED_DATA_GUESS = Path(__file__).resolve().parents[2] / "shared" / "data"


@contextlib.contextmanager
def running_server(checkpoint: Path, **server_config: Any) -> Iterator[str]:
    """A GrpcServer over the native engine on a background event loop; yields "127.0.0.1:PORT"."""
    from serve.api.grpc_server import GrpcServer, GrpcServerConfig
    from serve.backends.native import NativeBackend
    from serve.engine.llm_engine import EngineConfig

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="demo-grpc-server", daemon=True)
    thread.start()

    def call(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    server = GrpcServer(NativeBackend(EngineConfig(model=str(checkpoint))),
                        GrpcServerConfig(host="127.0.0.1", port=0, **server_config))
    try:
        port = call(server.start())
        call(server.load())
        yield f"127.0.0.1:{port}"
    finally:
        with contextlib.suppress(Exception):
            call(server.shutdown(grace_s=5.0))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def write_doc_match_task(heldout_file: Path, out_dir: Path, *, num_items: int = 200, seed: int = 0) -> Path:
    """The stdlib_doc_match task file and its data (JSON Lines) in `out_dir`; returns the task file."""
    docs = []
    with open(heldout_file, encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            if record.get("signature") and record.get("summary") and record.get("kind") in ("function", "class"):
                docs.append(record)
    rng = random.Random(seed)
    rng.shuffle(docs)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, doc in enumerate(docs[:num_items]):
        others = [d["summary"] for d in docs if d["summary"] != doc["summary"]]
        choices = rng.sample(others, 3)
        gold = i % 4
        choices.insert(gold, doc["summary"])
        rows.append({"signature": doc["signature"], "choices": choices, "gold": gold})
    data = out_dir / "stdlib_doc_match.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    task = out_dir / "stdlib_doc_match.yaml"
    task.write_text("# Held-out stdlib docs: after a signature, which of four summaries is its own? (chance 25%)\n"
                    "name: stdlib_doc_match\nkind: multiple_choice\ndata: stdlib_doc_match.jsonl\n"
                    'prompt: "{{signature}}\\n\\n"\nchoices: choices\ngold: "{{gold}}"\ntarget_delimiter: ""\n',
                    encoding="utf-8")
    (out_dir / "heldout_perplexity.yaml").write_text(
        f"name: heldout_perplexity\nkind: perplexity\ndata: {json.dumps(str(heldout_file))}\n", encoding="utf-8")
    return task


def find_data_root(given: str | Path | None) -> Path | None:
    for candidate in (given, os.environ.get("LMFORGE_DATA_ROOT"), SHARED_DATA_GUESS):
        if candidate and (Path(candidate) / "eval" / "llm-foundry" / "arc_easy.jsonl").is_file():
            return Path(candidate)
    return None


def serve_chat_and_evaluate(checkpoint: Path, heldout_file: Path, work_dir: Path, *,
                            data_root: str | Path | None = None, print_fn: Callable[[str], None] = print,
                            ) -> dict[str, Any]:
    """Serve `checkpoint`, chat a few turns, evaluate; returns the evaluation report."""
    from serve.chat import ChatSession
    from serve.client import Client
    from serve.evaluation.cli import EvalConfig, evaluate

    doc_task = write_doc_match_task(heldout_file, work_dir)
    tasks = [str(doc_task), str(work_dir / "heldout_perplexity.yaml")]
    shared = find_data_root(data_root)
    if shared is not None:
        tasks.append("arc_easy")
    with running_server(checkpoint) as address:
        print_fn(f"\nserving {checkpoint} on {address} (gRPC); a short chat (sampled, seeded; a model this small "
                 "and this briefly trained gives fluent-looking noise, not answers):")
        with Client(address, timeout_s=120) as client:
            session = ChatSession(client, system="You explain the Python standard library.", max_tokens=32,
                                  temperature=0.8, top_p=0.95, seed=0)
            for seed, turn in enumerate(CHAT_TURNS):
                # A seed per turn: one seed for all would draw the same noise each turn, and a barely trained
                # model's distributions differ too little between turns to give different replies.
                session.sampling["seed"] = seed
                reply = session.send(turn, lambda _: None)
                print_fn(f"  you> {turn}\n  assistant> {reply.strip()!r}")
        print_fn(f"\nevaluating through the server (lmforge eval, first {NUM_EVAL_ITEMS} items per task"
                 + ("" if shared else "; ARC-Easy too when ../shared/data or --data-root is there") + "):")
        report = evaluate(EvalConfig(target=f"grpc://{address}", task=tasks, data_root=str(shared) if shared else None,
                                     limit=NUM_EVAL_ITEMS, output=str(work_dir / "eval_report.json"), resume=False,
                                     progress=False), print_fn=lambda line: print_fn(_indent(line)))
    print_fn("  server stopped")
    return report


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())
