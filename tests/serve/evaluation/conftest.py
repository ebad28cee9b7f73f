"""A real server (the trained tiny checkpoint, loopback, data root) and a small synthetic data root for
end-to-end evaluation tests. The server is the one tests/serve/api uses (BackgroundServer)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from serve.api.grpc_server import GrpcServerConfig
from serve.backends.native import NativeBackend
from tests.serve.api.conftest import BackgroundServer, engine_config

WORDS = ("the function returns a list of values from the module and the class defines its method for each "
         "argument given to the object when called with keyword names").split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="package")
def data_root(tmp_path_factory) -> Path:
    """mc.jsonl (200 four-way questions over stdlib-doc words), text.jsonl (40 texts), and task files."""
    root = tmp_path_factory.mktemp("data_root")
    rng = random.Random(0)
    with open(root / "mc.jsonl", "w") as fh:
        for i in range(200):
            fh.write(json.dumps({"question": _sentence(rng, 8), "choices": [_sentence(rng, rng.randint(1, 5)) for _ in range(4)],
                                 "gold": i % 4}) + "\n")
    with open(root / "text.jsonl", "w") as fh:
        for _ in range(40):
            fh.write(json.dumps({"text": _sentence(rng, rng.randint(20, 120))}) + "\n")
    (root / "mc.yaml").write_text('name: mc\nkind: multiple_choice\ndata: mc.jsonl\n'
                                  'prompt: "Question: {{question}}\\nAnswer:"\nchoices: choices\ngold: "{{gold}}"\n')
    (root / "ppl.yaml").write_text("name: ppl\nkind: perplexity\ndata: text.jsonl\n")
    (root / "gen.yaml").write_text('name: gen\nkind: generation\ndata: mc.jsonl\nprompt: "{{question}}"\n'
                                   'reference: "{{choices[gold]}}"\nmax_tokens: 8\nuntil: ["\\n"]\n'
                                   "metrics: [exact_match, bleu, rouge]\n")
    return root


@pytest.fixture(scope="package")
def eval_server(trained_checkpoint, data_root):
    server = BackgroundServer(NativeBackend(engine_config(trained_checkpoint)),
                              GrpcServerConfig(port=0, data_root=str(data_root)))
    yield server
    server.stop()
