"""Fixtures for lifecycle tests: a tiny corpus, tokenizer and model built in seconds."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

WORDS = ("the model reads text and learns to predict the next token from the ones before it while the "
         "optimizer follows the gradient of the loss over many steps of training on packed sequences").split()


def write_corpus(path: Path, num_docs: int = 300, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(num_docs):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
            fh.write(json.dumps({"text": text.capitalize() + "."}) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "train.jsonl")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, tiny_corpus) -> Path:
    from lifecycle.data.readers import iter_documents
    from lifecycle.tokenizer import save_tokenizer, train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    tok = train_tokenizer((d.text for d in iter_documents([tiny_corpus])), vocab_size=400, show_progress=False)
    save_tokenizer(tok, out)
    return out


@pytest.fixture(scope="session")
def micro_model_config():
    """Smaller than the `tiny` preset: unit tests need a real Llama, not a useful one."""
    from lifecycle.presets import ModelConfig

    return ModelConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=160, vocab_size=400, max_position_embeddings=256, source="test")


@pytest.fixture(scope="session")
def micro_model_yaml(tmp_path_factory, micro_model_config) -> Path:
    import dataclasses

    import yaml

    data = {k: v for k, v in dataclasses.asdict(micro_model_config).items() if k != "source"}
    path = tmp_path_factory.mktemp("cfg") / "model.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
