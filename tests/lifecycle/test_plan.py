"""`lifecycle.plan`: parameter and KV-cache arithmetic against real transformers models, activation
estimates against the tensors autograd actually saves, and the `plan` subcommand."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from transformers import LlamaForCausalLM

from lifecycle.errors import ConfigError
from lifecycle.plan import (PlanConfig, activation_bytes, add_command, build_plan, bytes_per_param,
                            count_parameters, dataset_tokens, inference_memory, kv_cache_bytes_per_token,
                            training_flops_per_token, training_memory)
from lifecycle.presets import PRESETS, ModelConfig


def build_model(cfg: ModelConfig, *, meta: bool = False, attn: str = "sdpa") -> LlamaForCausalLM:
    hf = cfg.to_hf()
    hf._attn_implementation = attn
    if meta:  # count base/1b without allocating their weights
        with torch.device("meta"):
            return LlamaForCausalLM(hf)
    torch.manual_seed(0)
    return LlamaForCausalLM(hf)


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


CUSTOM = {
    "tied_mha": ModelConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                            intermediate_size=352, vocab_size=1000, tie_word_embeddings=True),
    "untied_gqa4": ModelConfig(hidden_size=128, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                               intermediate_size=300, vocab_size=777),
    "tied_mqa": ModelConfig(hidden_size=96, num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=1,
                            intermediate_size=256, vocab_size=500, tie_word_embeddings=True),
}


# --- parameters -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PRESETS) + list(CUSTOM))
def test_count_parameters_matches_transformers(name):
    cfg = PRESETS.get(name) or CUSTOM[name]
    model = build_model(cfg, meta=name in ("base", "1b"))
    counted = count_parameters(cfg)
    assert counted.total == model.num_parameters()
    inner = model.model
    assert counted.embedding == inner.embed_tokens.weight.numel()
    assert counted.attention == sum(numel(layer.self_attn) for layer in inner.layers)
    assert counted.mlp == sum(numel(layer.mlp) for layer in inner.layers)
    assert counted.norms == numel(inner.norm) + sum(
        numel(layer.input_layernorm) + numel(layer.post_attention_layernorm) for layer in inner.layers)
    tied = model.lm_head.weight is inner.embed_tokens.weight
    assert tied == cfg.tie_word_embeddings
    assert counted.lm_head == (0 if tied else model.lm_head.weight.numel())
    assert counted.non_embedding == counted.total - counted.embedding - counted.lm_head


def test_training_flops_count_every_matmul_weight():
    # Brute-force reference: every nn.Linear weight (lm_head included, even when tied) is one
    # multiply-add per token forward, x3 for forward + backward (Kaplan et al. 2020, Table 1).
    for cfg in (PRESETS["tiny"], PRESETS["small"], CUSTOM["tied_mqa"]):
        model = build_model(cfg)
        n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        seq_len = 256
        attention = 6 * cfg.num_hidden_layers * seq_len * cfg.hidden_size
        assert training_flops_per_token(cfg, seq_len) == 6 * n_matmul + attention


# --- KV cache -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, dtype_bytes", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_kv_cache_bytes_per_token_matches_dynamic_cache(dtype, dtype_bytes):
    cfg = PRESETS["tiny"]
    model = build_model(cfg).to(dtype).eval()
    num_tokens = 13
    with torch.no_grad():
        out = model(torch.randint(0, cfg.vocab_size, (1, num_tokens)), use_cache=True)
    cache = out.past_key_values
    assert len(cache.layers) == cfg.num_hidden_layers
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert cache.layers[0].keys.shape == (1, cfg.num_key_value_heads, num_tokens, cfg.head_dim)
    assert kv_cache_bytes_per_token(cfg, dtype_bytes) == held / num_tokens


def test_inference_memory():
    cfg = PRESETS["small"]
    n = count_parameters(cfg).total
    bf16 = inference_memory(cfg, dtype_bytes=2, context_len=2048, batch=3)
    assert bf16.weights_bytes == 2 * n
    assert bf16.kv_cache_bytes == 3 * 2048 * kv_cache_bytes_per_token(cfg, 2)
    assert bf16.total_bytes == bf16.weights_bytes + bf16.kv_cache_bytes
    int4 = inference_memory(cfg, dtype_bytes=0.5, context_len=10, batch=1)
    assert int4.weights_bytes == n // 2
    assert int4.kv_cache_bytes == 10 * kv_cache_bytes_per_token(cfg, 2)  # weight-only quant keeps 16-bit KV


# --- model states and activations -----------------------------------------------------------------

def test_bytes_per_param_fp32_and_mixed_precision():
    assert bytes_per_param("fp32").total == 16  # 4 weights + 4 grads + 8 (m, v)
    mixed = bytes_per_param("bf16")
    assert (mixed.weights, mixed.gradients, mixed.optimizer) == (2, 2 + 4, 4 + 8)
    assert mixed.total == 20 == bytes_per_param("fp16").total
    assert bytes_per_param("fp32", "sgd").total == 12


@pytest.mark.parametrize("stage, expected", [(0, (2, 6, 12)), (1, (2, 6, 3)), (2, (2, 1.5, 3)), (3, (0.5, 1.5, 3))])
def test_zero_stages_shard_states(stage, expected):
    bpp = bytes_per_param("bf16", zero_stage=stage, world_size=4)
    assert (bpp.weights, bpp.gradients, bpp.optimizer) == expected


def test_training_memory_is_bytes_per_param_times_params_plus_activations():
    cfg = PRESETS["base"]
    n = count_parameters(cfg).total
    mem = training_memory(cfg, micro_batch_size=4, seq_len=1024, precision="bf16", world_size=8, zero_stage=3)
    assert (mem.weights_bytes, mem.gradients_bytes, mem.optimizer_bytes) == (n * 2 / 8, n * 6 / 8, n * 12 / 8)
    fp32 = training_memory(cfg, micro_batch_size=4, seq_len=1024, precision="fp32")
    assert fp32.weights_bytes + fp32.gradients_bytes + fp32.optimizer_bytes == 16 * n
    assert fp32.total_bytes == 16 * n + fp32.activations_bytes
    checkpointed = training_memory(cfg, micro_batch_size=4, seq_len=1024, precision="fp32",
                                   gradient_checkpointing=True)
    assert checkpointed.activations_bytes < fp32.activations_bytes / 2


def saved_tensor_bytes(model: LlamaForCausalLM, input_ids: torch.Tensor) -> int:
    """Bytes of distinct non-parameter storages autograd saves in one training forward, plus the logits."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(input_ids=input_ids, labels=input_ids, use_cache=False)
    logits = out.logits.untyped_storage()  # alive until backward: held by the output
    saved[logits.data_ptr()] = logits.nbytes()
    return sum(saved.values())


@pytest.mark.parametrize("attn, attention", [("eager", "eager"), ("sdpa", "flash")])
@pytest.mark.parametrize("dtype, dtype_bytes", [(torch.float32, 4), (torch.bfloat16, 2)])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_matches_saved_tensors(attn, attention, dtype, dtype_bytes, checkpointing):
    cfg = PRESETS["tiny"]
    model = build_model(cfg, attn=attn).to(dtype).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    batch, seq_len = 2, 96
    measured = saved_tensor_bytes(model, torch.randint(0, cfg.vocab_size, (batch, seq_len)))
    est = activation_bytes(cfg, micro_batch_size=batch, seq_len=seq_len, dtype_bytes=dtype_bytes,
                           attention=attention, gradient_checkpointing=checkpointing)
    # The forward of a checkpointed model keeps only layer inputs; the one layer recomputed during
    # backward is the rest of the estimate.
    forward = est.total_bytes - (est.layer_bytes if checkpointing else 0)
    assert forward == pytest.approx(measured, rel=0.01)


# --- dataset --------------------------------------------------------------------------------------

def test_dataset_tokens():
    assert dataset_tokens(3, 1000, 512) == 1_536_000
    assert dataset_tokens(0.5, 10, 101.5) == 508
    with pytest.raises(ConfigError, match="--num-examples"):
        dataset_tokens(1, 0, 100)


# --- CLI ------------------------------------------------------------------------------------------

def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_command(parser.add_subparsers(dest="subcommand"))
    return parser.parse_args(["plan", *argv])


@pytest.mark.parametrize("preset", list(PRESETS))
def test_cli_prints_each_preset(preset, capsys):
    args = parse("--preset", preset)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    total = count_parameters(PRESETS[preset]).total
    for text in ("parameters", f"({total:,})", "training memory per device", "activations are an estimate",
                 "FLOPs/token", "KV cache per token", "int4"):
        assert text in out
    assert "dataset" not in out


def test_cli_json_and_dataset_eta(capsys):
    args = parse("--preset", "base", "--seq-len", "1024", "--micro-batch-size", "2", "--grad-accum", "4",
                 "--world-size", "2", "--zero-stage", "1", "--gradient-checkpointing", "--epochs", "2",
                 "--num-examples", "1000", "--avg-len", "500", "--tokens-per-s", "10000", "--json")
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    cfg = PRESETS["base"]
    assert report["parameters"]["total"] == count_parameters(cfg).total
    mem = report["training_memory_per_device"]
    assert mem["bytes_per_param"] == {"weights": 2, "gradients": 6, "optimizer": 6, "total": 14}
    assert mem["total_bytes"] == training_memory(cfg, micro_batch_size=2, seq_len=1024, precision="bf16",
                                                 world_size=2, zero_stage=1, gradient_checkpointing=True).total_bytes
    assert report["compute"]["tokens_per_optimizer_step"] == 2 * 1024 * 4 * 2
    assert report["dataset"]["tokens"] == 1_000_000
    assert report["dataset"]["optimizer_steps"] == 62  # ceil(1e6 / 16384)
    assert report["dataset"]["eta_s"] == 100
    assert report["inference"]["kv_cache_bytes_per_token"] == kv_cache_bytes_per_token(cfg, 2)
    params = count_parameters(cfg)  # the engine packs qkv, o, gate_up, down and the LM head: fp32, once more
    assert report["inference"]["cpu_packed_weights_bytes"] == 4 * (params.attention + params.mlp
                                                                   + cfg.hidden_size * cfg.vocab_size)

    args = parse("--preset", "tiny", "--num-examples", "100", "--avg-len", "50", "--tokens-per-s", "5000")
    args.func(args)
    out = capsys.readouterr().out
    assert "ETA" in out and "5K tokens/s" in out


def test_cli_model_config_file_and_vocab_override(tmp_path, capsys):
    path = tmp_path / "model.yaml"
    path.write_text("hidden_size: 384\nnum_attention_heads: 6\nnum_key_value_heads: 2\n", encoding="utf-8")
    args = parse("--preset", "tiny", "--model-config", str(path), "--vocab-size", "5000", "--json")
    args.func(args)
    report = json.loads(capsys.readouterr().out)
    expected = PRESETS["tiny"].replace(hidden_size=384, num_attention_heads=6, num_key_value_heads=2, vocab_size=5000)
    assert report["parameters"]["total"] == count_parameters(expected).total
    assert report["model"]["head_dim"] == 64


@pytest.mark.parametrize("argv, message", [
    (("--preset", "huge"), "unknown preset 'huge'"),
    (("--seq-len", "0"), "--seq-len must be positive"),
    (("--micro-batch-size", "-2"), "--micro-batch-size must be positive"),
    (("--vocab-size", "1376"), "intermediate_size equals vocab_size"),
    (("--seq-len", "4096"), "--seq-len 4096 exceeds max_position_embeddings=2048"),
    (("--num-examples", "10"), "--num-examples and --avg-len go together"),
])
def test_cli_bad_input_raises_config_error(argv, message):
    args = parse(*argv)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        args.func(args)


def test_model_config_heads_not_dividing_hidden(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("hidden_size: 500\n", encoding="utf-8")
    args = parse("--preset", "small", "--model-config", str(path))
    with pytest.raises(ConfigError, match=r"num_attention_heads=8 does not divide hidden_size=500"):
        args.func(args)


def test_pure_functions_reject_bad_values():
    with pytest.raises(ConfigError, match="--precision 'fp8'"):
        bytes_per_param("fp8")
    with pytest.raises(ConfigError, match="--zero-stage 4"):
        bytes_per_param("bf16", zero_stage=4)
    with pytest.raises(ConfigError, match="--attention 'paged'"):
        activation_bytes(PRESETS["tiny"], micro_batch_size=1, seq_len=8, dtype_bytes=2, attention="paged")
    with pytest.raises(ConfigError, match="--tokens-per-s needs"):
        PlanConfig(tokens_per_s=100.0)
    build_plan(PRESETS["tiny"], PlanConfig(seq_len=1024))  # exactly the maximum is allowed
