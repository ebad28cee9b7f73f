"""Model sizes as literal configs of Llama-architecture decoders.

All presets are `transformers.LlamaForCausalLM` (RMSNorm, RoPE, SwiGLU MLP, grouped-query attention)
so transformers, vLLM, onnxruntime-genai and every HF tool load them unchanged. Every preset keeps
`intermediate_size != vocab_size`: some exporters (onnxruntime-genai's builder) take any linear layer
with a vocabulary-sized output for the LM head.

Parameter counts below are for the preset's default vocabulary; `lmforge plan` computes them for any
config and tests check the arithmetic against `model.num_parameters()`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lifecycle.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-style decoder. Field names follow transformers' `LlamaConfig`."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    source: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{self.source}: {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"{self.source}: num_attention_heads={self.num_attention_heads} does not divide "
                f"hidden_size={self.hidden_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{self.source}: num_key_value_heads={self.num_key_value_heads} does not divide "
                f"num_attention_heads={self.num_attention_heads} (grouped-query attention needs equal groups)")
        if self.head_dim % 2:
            raise ConfigError(f"{self.source}: head_dim={self.head_dim} must be even for RoPE")
        if self.intermediate_size == self.vocab_size:
            raise ConfigError(
                f"{self.source}: intermediate_size equals vocab_size ({self.vocab_size}); exporters mistake "
                "such an MLP projection for the LM head, pick a different intermediate_size")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ConfigError(f"{self.source}: rope_theta and rms_norm_eps must be positive")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_hf(self, **extra: Any):
        """The transformers `LlamaConfig` for this model."""
        from transformers import LlamaConfig

        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "source"}
        kwargs.update(head_dim=self.head_dim, hidden_act="silu", attention_bias=False, mlp_bias=False)
        kwargs.update(extra)
        return LlamaConfig(**kwargs)

    @classmethod
    def from_hf(cls, hf_config: Any, source: str = "config.json") -> "ModelConfig":
        """Read a Llama/Qwen2-style transformers config (attribute access)."""
        def get(name: str, default: Any = None) -> Any:
            return getattr(hf_config, name, default)

        return cls(
            hidden_size=get("hidden_size"),
            num_hidden_layers=get("num_hidden_layers"),
            num_attention_heads=get("num_attention_heads"),
            num_key_value_heads=get("num_key_value_heads") or get("num_attention_heads"),
            intermediate_size=get("intermediate_size"),
            vocab_size=get("vocab_size"),
            max_position_embeddings=get("max_position_embeddings", 2048),
            rope_theta=float(_rope_theta(hf_config)),
            rms_norm_eps=float(get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            source=source,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"source"}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"{source}: unknown model config key(s) {sorted(unknown)}; known: {sorted(names)}")
        try:
            return cls(**data, source=source)
        except TypeError as err:
            raise ConfigError(f"{source}: {err}") from None


def _rope_theta(hf_config: Any) -> float:
    theta = getattr(hf_config, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in rope_parameters
        params = getattr(hf_config, "rope_parameters", None) or {}
        theta = params.get("rope_theta", 10000.0)
    return theta


# Literal configs: greppable, no arithmetic hiding the numbers. Comments give parameter counts at the
# default vocabulary (embeddings included; tied embeddings counted once).
PRESETS: dict[str, ModelConfig] = {
    # ~3.5M params: `tiny` with 2 layers, the demo's speculative-decoding draft for `small`. Distilled on the
    # target's own output it agrees with it as often as 4 layers do (0.87 vs 0.84 greedy) at ~half the cost per
    # pass: W3 2.1x instead of 1.75x (1-thread CPU time, docs/BENCHMARKS.md "W3 draft quality").
    "draft": ModelConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=640, vocab_size=8192, max_position_embeddings=1024,
                         tie_word_embeddings=True, source="preset draft"),
    # ~4.9M params: a small draft model and the unit-test model.
    "tiny": ModelConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=640, vocab_size=8192, max_position_embeddings=1024,
                        tie_word_embeddings=True, source="preset tiny"),
    # ~31.6M params: the demo target.
    "small": ModelConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                         intermediate_size=1376, vocab_size=8192, max_position_embeddings=2048,
                         source="preset small"),
    # ~124.5M params (GPT-2 small / Pythia-160M class).
    "base": ModelConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                        intermediate_size=2048, vocab_size=32000, max_position_embeddings=2048,
                        source="preset base"),
    # ~1.1B params (TinyLlama shape): for GPU users.
    "1b": ModelConfig(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                      intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048,
                      source="preset 1b"),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def resolve_model_config(preset: str | None, model_config_file: str | None = None,
                         vocab_size: int | None = None) -> ModelConfig:
    """A preset, optionally overridden by a YAML/JSON file of `ModelConfig` fields, with the tokenizer's vocab."""
    from lifecycle.config import read_yaml_mapping

    base = get_preset(preset or "small")
    if model_config_file:
        data = read_yaml_mapping(model_config_file)
        merged = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.name != "source"}
        unknown = set(data) - set(merged)
        if unknown:
            raise ConfigError(f"{model_config_file}: unknown model config key(s) {sorted(unknown)}; "
                              f"known: {sorted(merged)}")
        merged.update(data)
        base = ModelConfig.from_dict(merged, source=str(model_config_file))
    if vocab_size is not None and vocab_size != base.vocab_size:
        base = base.replace(vocab_size=vocab_size)
    return base
