"""A small trained checkpoint for engine tests: real text (the stdlib corpus), a 512-token BPE, a
2-layer Llama trained for a minute's fraction, so greedy choices have real margins (a random-init
model is all near-ties, which no two implementations agree on)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    import yaml

    from lifecycle.demo import prepare_default_data
    from lifecycle.recipes.pretrain import PretrainConfig, pretrain

    root = tmp_path_factory.mktemp("served")
    train_file, heldout = prepare_default_data(root, vocab_size=512, progress=False)
    model_yaml = root / "model.yaml"
    model_yaml.write_text(yaml.safe_dump(dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, intermediate_size=176, vocab_size=512,
                                              max_position_embeddings=512)))
    return pretrain(PretrainConfig(data=[str(train_file)], eval_data=[str(heldout)], tokenizer=str(root / "tokenizer"),
                                   model_config=str(model_yaml), output_dir=str(root / "run"), seq_len=128,
                                   micro_batch_size=16, global_batch_size=16, max_steps=60, warmup_steps=5,
                                   learning_rate=3e-3, save_every=0, eval_every=0, progress=False))
