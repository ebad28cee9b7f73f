"""A small trained checkpoint whose shapes the GPTQ format and the int4 kernel accept (hidden 64,
intermediate 128: multiples of 32; fused outputs multiples of 16), and its quantized children."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # GPTQModel refuses to start workers on 2 cores otherwise


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    import yaml

    from lifecycle.demo import prepare_default_data
    from lifecycle.recipes.pretrain import PretrainConfig, pretrain

    root = tmp_path_factory.mktemp("quant-src")
    train_file, heldout = prepare_default_data(root, vocab_size=512, progress=False)
    (root / "model.yaml").write_text(yaml.safe_dump(dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                         num_key_value_heads=2, intermediate_size=128, vocab_size=512,
                                                         max_position_embeddings=512)))
    return pretrain(PretrainConfig(data=[str(train_file)], eval_data=[str(heldout)], tokenizer=str(root / "tokenizer"),
                                   model_config=str(root / "model.yaml"), output_dir=str(root / "run"), seq_len=128,
                                   micro_batch_size=16, global_batch_size=16, max_steps=60, warmup_steps=5,
                                   learning_rate=3e-3, save_every=0, eval_every=0, progress=False))


@pytest.fixture(scope="session")
def quantized(tiny_checkpoint, tmp_path_factory):
    """quantized(spec, **overrides) -> path of a quantized child of tiny_checkpoint, made once per session."""
    from quant.config import parse_spec
    from quant.quantize import calibration_ids, open_source, quantize_checkpoint

    root = tmp_path_factory.mktemp("quantized")
    made: dict[str, Path] = {}
    src = open_source(tiny_checkpoint)

    def make(spec: str, **overrides) -> Path:
        key = spec + repr(sorted(overrides.items()))
        if key not in made:
            cfg = parse_spec(spec, num_samples=16, seq_len=64, **overrides)
            calib, source = calibration_ids(src, cfg, None) if cfg.method == "gptq" else (None, "")
            out = root / f"q{len(made)}"
            quantize_checkpoint(src, out, cfg, calib=calib, calib_source=source, progress=False)
            made[key] = out
        return made[key]

    return make
