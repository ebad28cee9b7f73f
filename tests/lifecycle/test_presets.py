"""Presets are real Llama configs of the advertised sizes; impossible configs are refused by name."""

from __future__ import annotations

import pytest
import torch

from lifecycle.errors import ConfigError
from lifecycle.presets import PRESETS, ModelConfig, get_preset, resolve_model_config

EXPECTED_M = {"draft": (3, 4), "tiny": (4, 6), "small": (25, 35), "base": (110, 140), "1b": (1000, 1300)}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_sizes_and_architecture(name):
    from transformers import LlamaForCausalLM

    cfg = get_preset(name)
    assert cfg.intermediate_size != cfg.vocab_size
    assert cfg.num_attention_heads > cfg.num_key_value_heads  # grouped-query attention
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg.to_hf())
    lo, hi = EXPECTED_M[name]
    assert lo <= model.num_parameters() / 1e6 <= hi
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"
    assert model.config.hidden_act == "silu"


def test_hf_round_trip():
    cfg = get_preset("small")
    assert ModelConfig.from_hf(cfg.to_hf(), source="x") == cfg


@pytest.mark.parametrize("changes,match", [
    ({"num_attention_heads": 7}, "does not divide hidden_size"),
    ({"num_key_value_heads": 3}, "does not divide num_attention_heads"),
    ({"hidden_size": 0}, "hidden_size must be a positive integer"),
    ({"intermediate_size": 8192}, "intermediate_size equals vocab_size"),
])
def test_impossible_configs(changes, match):
    with pytest.raises(ConfigError, match=match):
        get_preset("small").replace(**changes)


def test_unknown_preset_and_model_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        get_preset("huge")
    bad = tmp_path / "m.yaml"
    bad.write_text("hidden_size: 500\nnum_attention_heads: 8\n")
    with pytest.raises(ConfigError, match=r"m.yaml: num_attention_heads=8 does not divide hidden_size=500"):
        resolve_model_config("small", str(bad))
    bad.write_text("hidden_sise: 512\n")
    with pytest.raises(ConfigError, match="unknown model config key"):
        resolve_model_config("small", str(bad))
