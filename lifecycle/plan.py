"""`lmforge plan`: parameter, memory and compute arithmetic for a Llama-style `ModelConfig`.

Everything here is a pure function of the config and a few sizes; nothing allocates a model.
Parameters, weight/gradient/optimizer bytes and the KV cache are exact (tests check them against
`LlamaForCausalLM.num_parameters()` and a real `DynamicCache`); activation memory is an estimate
built by counting the tensors autograd saves in transformers' Llama forward (see `activation_bytes`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from lifecycle.cli import add_subcommand
from lifecycle.config import add_config_arguments, config_from_args
from lifecycle.errors import ConfigError
from lifecycle.presets import PRESETS, ModelConfig, resolve_model_config

# Bytes per element of the weights (and of activations) for each training precision.
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2}
# Weight-only storage at inference. int8/int4 exclude quantization scales (~2 B per group of 32-128
# weights, i.e. +1.5-6%) and assume every linear layer, embeddings included, is quantized.
WEIGHT_DTYPE_BYTES: dict[str, float] = {"fp32": 4, "bf16": 2, "int8": 1, "int4": 0.5}
# Optimizer state kept per parameter, always fp32: AdamW holds m and v (4 + 4), SGD one momentum buffer.
OPTIMIZER_STATE_BYTES: dict[str, int] = {"adamw": 8, "sgd": 4}


@dataclass(frozen=True)
class ParamCount:
    """Parameters by component. Totals over layers are properties so the parts always sum up."""

    num_layers: int
    embedding: int           # embed_tokens: vocab x hidden
    attention_per_layer: int  # q, o: hidden x hidden; k, v: hidden x (kv_heads * head_dim) under GQA
    mlp_per_layer: int       # SwiGLU gate, up: hidden x intermediate; down: intermediate x hidden
    norms_per_layer: int     # input_layernorm and post_attention_layernorm (RMSNorm weight only)
    final_norm: int
    lm_head: int             # 0 when tied to the embedding (the tensor is counted once)

    @property
    def attention(self) -> int:
        return self.attention_per_layer * self.num_layers

    @property
    def mlp(self) -> int:
        return self.mlp_per_layer * self.num_layers

    @property
    def norms(self) -> int:
        return self.norms_per_layer * self.num_layers + self.final_norm

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.mlp + self.norms + self.lm_head

    @property
    def non_embedding(self) -> int:
        """Kaplan et al. 2020 (sec. 2.1) convention: without the embedding and the unembedding (lm_head)."""
        return self.attention + self.mlp + self.norms


def count_parameters(cfg: ModelConfig) -> ParamCount:
    h, kv_dim = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    return ParamCount(num_layers=cfg.num_hidden_layers, embedding=cfg.vocab_size * h,
                      attention_per_layer=2 * h * h + 2 * h * kv_dim, mlp_per_layer=3 * h * cfg.intermediate_size,
                      norms_per_layer=2 * h, final_norm=h, lm_head=0 if cfg.tie_word_embeddings else cfg.vocab_size * h)


@dataclass(frozen=True)
class BytesPerParam:
    weights: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer


def bytes_per_param(precision: str, optimizer: str = "adamw", *, zero_stage: int = 0,
                    world_size: int = 1) -> BytesPerParam:
    """Model state bytes per parameter on one device.

    fp32, AdamW: 4 weights + 4 grads + 8 (m, v) = 16 B/param.
    bf16/fp16 mixed precision, AdamW: 2 (16-bit weights) + 2 (16-bit grads) + 4 (fp32 gradient
    accumulation buffer, Megatron's `main_grad`, DeepSpeed's fp32 grad partition) + 4 (fp32 master
    weights) + 8 (fp32 m, v) = 20 B/param. The ZeRO paper (Rajbhandari et al. 2020, sec. 3.1) counts
    16 (no fp32 grad copy); torch.autocast keeps fp32 weights and is 16 + transient 16-bit casts.
    ZeRO (sec. 5): stage 1 shards optimizer states (master weights count as optimizer state there),
    stage 2 also gradients, stage 3 also the weights, each across `world_size` data-parallel ranks.
    """
    for flag, value, allowed in (("--precision", precision, DTYPE_BYTES), ("--zero-stage", zero_stage, (0, 1, 2, 3)),
                                 ("--optimizer", optimizer, OPTIMIZER_STATE_BYTES)):
        if value not in allowed:
            raise ConfigError(f"{flag} {value!r}: choose one of {', '.join(map(str, allowed))}")
    if world_size < 1:
        raise ConfigError(f"--world-size must be a positive integer, got {world_size!r}")
    state = OPTIMIZER_STATE_BYTES[optimizer]
    if precision == "fp32":
        weights, grads, opt = 4.0, 4.0, float(state)
    else:
        weights, grads, opt = 2.0, 2.0 + 4.0, 4.0 + state
    return BytesPerParam(weights=weights / world_size if zero_stage >= 3 else weights,
                         gradients=grads / world_size if zero_stage >= 2 else grads,
                         optimizer=opt / world_size if zero_stage >= 1 else opt)


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes autograd keeps for backward for one micro-batch on one device (an estimate)."""

    num_layers: int
    layer_bytes: int        # everything one decoder layer saves
    layer_input_bytes: int  # one layer's input: all a checkpointed layer keeps
    head_bytes: int         # final norm, logits and the loss
    gradient_checkpointing: bool

    @property
    def total_bytes(self) -> int:
        if self.gradient_checkpointing:  # every layer's input, plus one layer recomputed during backward
            return self.num_layers * self.layer_input_bytes + self.layer_bytes + self.head_bytes
        return self.num_layers * self.layer_bytes + self.head_bytes


def activation_bytes(cfg: ModelConfig, *, micro_batch_size: int, seq_len: int, dtype_bytes: int,
                     attention: str = "flash", gradient_checkpointing: bool = False) -> ActivationEstimate:
    """Count the tensors autograd saves in transformers' Llama forward (tests measure them with hooks).

    An estimate nonetheless: fused kernels (flash attention, fused RMSNorm / cross-entropy, Liger) save
    less, and the CUDA caching allocator adds fragmentation and transient peaks.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation", sec. 4.1) count s·b·h·(34 + 5·a·s/h)
    bytes per GPT layer at 16 bits. Redone for Llama (no dropout, SwiGLU, GQA, fp32 RMSNorm), per
    token, with e = activation bytes, g = kv_heads·head_dim, I = intermediate:
      RMSNorm (x2): fp32 copy of the input 4h + normalized e·h + output (the next matmul's input) e·h
      attention, flash/SDPA: q h, k g, v g, output (= o_proj input) h, all e; fp32 logsumexp 4·a
      attention, eager: q, repeat_kv'd k and v, o_proj input 4h·e + fp32 softmax probs 4·a·s
                        + their 16-bit cast a·s·e (the s^2 term that fused kernels avoid)
      SwiGLU MLP: gate out (silu input), silu out, up out, product (down input) 4·I·e
    Head: final RMSNorm, logits V·e (kept by the output) + fp32 log-softmax V·4 (cross-entropy).
    """
    if attention not in ("flash", "eager"):
        raise ConfigError(f"--attention {attention!r}: choose flash or eager")
    h, e, a = cfg.hidden_size, dtype_bytes, cfg.num_attention_heads
    g = cfg.num_key_value_heads * cfg.head_dim
    norm = 4 * h + 2 * e * h
    if attention == "flash":
        attn = e * (2 * h + 2 * g) + 4 * a
    else:
        attn = e * 4 * h + a * seq_len * (4 + (e if e != 4 else 0))  # fp32: the cast is a no-op
    tokens = micro_batch_size * seq_len
    return ActivationEstimate(
        num_layers=cfg.num_hidden_layers, layer_bytes=tokens * (2 * norm + attn + 4 * cfg.intermediate_size * e),
        layer_input_bytes=tokens * h * e, head_bytes=tokens * (norm + cfg.vocab_size * (e + 4)),
        gradient_checkpointing=gradient_checkpointing)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Training memory on one device: model states (exact) plus activations (estimate)."""

    num_params: int
    bytes_per_param: BytesPerParam  # after ZeRO sharding
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.gradients_bytes + self.optimizer_bytes + self.activations_bytes


def training_memory(cfg: ModelConfig, *, micro_batch_size: int, seq_len: int, precision: str,
                    optimizer: str = "adamw", gradient_checkpointing: bool = False, world_size: int = 1,
                    zero_stage: int = 0, attention: str = "flash") -> MemoryBreakdown:
    bpp = bytes_per_param(precision, optimizer, zero_stage=zero_stage, world_size=world_size)
    n = count_parameters(cfg).total
    return MemoryBreakdown(
        num_params=n, bytes_per_param=bpp, weights_bytes=math.ceil(n * bpp.weights),
        gradients_bytes=math.ceil(n * bpp.gradients), optimizer_bytes=math.ceil(n * bpp.optimizer),
        activations_bytes=activation_bytes(cfg, micro_batch_size=micro_batch_size, seq_len=seq_len,
                                           dtype_bytes=DTYPE_BYTES[precision], attention=attention,
                                           gradient_checkpointing=gradient_checkpointing).total_bytes)


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int) -> int:
    # K and V, each (kv_heads, head_dim) per layer per token: GQA shrinks it by heads / kv_heads.
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes


@dataclass(frozen=True)
class InferenceMemory:
    weights_bytes: int
    kv_cache_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes


def inference_memory(cfg: ModelConfig, *, dtype_bytes: float, context_len: int, batch: int,
                     kv_dtype_bytes: int | None = None) -> InferenceMemory:
    """Weights at `dtype_bytes` (0.5 for int4) plus the KV cache of `batch` sequences of `context_len`.

    The KV cache defaults to the weights' dtype, or 16-bit under weight-only int8/int4 quantization.
    """
    kv_bytes = kv_dtype_bytes if kv_dtype_bytes is not None else max(2, int(dtype_bytes))
    return InferenceMemory(weights_bytes=math.ceil(count_parameters(cfg).total * dtype_bytes),
                           kv_cache_bytes=kv_cache_bytes_per_token(cfg, kv_bytes) * context_len * batch)


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6·N + 6·L·s·h: Kaplan et al. 2020, Table 1 (forward 2N + 2·L·n_ctx·d_attn; backward = 2x forward).

    N counts every matmul weight as Kaplan's N does (attention and MLP; norms are elementwise) plus the
    lm_head matmul (hidden x vocab, done even when tied; Kaplan drop it as small, it is not for small
    models: 14% of the small preset's compute at s=512). The attention term is
    QK^T and AV averaged over a causal context (s/2 keys); PaLM's 12·L·s·h (Chowdhery et al. 2022,
    App. B) counts the full s x s square.
    """
    params = count_parameters(cfg)
    n_matmul = params.attention + params.mlp + cfg.hidden_size * cfg.vocab_size
    return 6.0 * n_matmul + 6.0 * cfg.num_hidden_layers * seq_len * cfg.hidden_size


def dataset_tokens(epochs: float, num_examples: int, avg_len: float) -> int:
    for flag, value in (("--epochs", epochs), ("--num-examples", num_examples), ("--avg-len", avg_len)):
        if value <= 0:
            raise ConfigError(f"{flag} must be positive, got {value!r}")
    return round(epochs * num_examples * avg_len)


# Fine-tuning learning rates practitioners converge on (full: ~2e-5, LoRA: ~1e-4) at a global batch of
# REFERENCE_BATCH examples; for another batch the square-root rule (Malladi et al. 2022, "On the SDEs and
# scaling rules for adaptive gradient algorithms": Adam's lr scales with sqrt(batch)) keeps the noise scale.
FULL_FINETUNE_LR, LORA_LR, REFERENCE_BATCH = 2e-5, 1e-4, 32
# Share of domain data past which general abilities are reported to drop: continued pretraining ~15%
# (replay of general text, e.g. Ibrahim et al. 2024 "Simple and scalable strategies to continually pre-train"),
# SFT ~50%.
MAX_DOMAIN_SHARE = {"pretrain": 0.15, "sft": 0.50}


def default_finetune_lr(*, is_lora: bool, global_batch_size: int) -> float:
    base = LORA_LR if is_lora else FULL_FINETUNE_LR
    return base * math.sqrt(global_batch_size / REFERENCE_BATCH)


def domain_share_warning(stage: str, share: float) -> str | None:
    """A warning when `share` of the data is domain data past what `stage` tolerates, else None."""
    limit = MAX_DOMAIN_SHARE[stage]
    if share > limit:
        return (f"warning: {share:.0%} domain data in {'continued pretraining' if stage == 'pretrain' else 'SFT'} "
                f"(more than ~{limit:.0%}): general abilities are reported to drop; mix in general data")
    return None


@dataclass
class PlanConfig:
    """The `lmforge plan` flags; each field is one `--flag`."""

    preset: str = field(default="small", metadata={"help": f"model size: {', '.join(PRESETS)}"})
    model_config: str | None = field(default=None, metadata={"help": "YAML/JSON of ModelConfig fields over the preset"})
    vocab_size: int | None = field(default=None, metadata={"help": "override the preset's vocabulary"})
    seq_len: int = field(default=512, metadata={"help": "training sequence length"})
    micro_batch_size: int = field(default=8, metadata={"help": "sequences per device per forward"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    world_size: int = field(default=1, metadata={"help": "data-parallel devices"})
    precision: Literal["fp32", "bf16", "fp16"] = field(default="bf16", metadata={"help": "bf16/fp16: mixed precision"})
    optimizer: Literal["adamw", "sgd"] = field(default="adamw", metadata={"help": "optimizer"})
    zero_stage: Literal[0, 1, 2, 3] = field(default=0, metadata={"help": "ZeRO stage (shards states)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute layer activations"})
    attention: Literal["flash", "eager"] = field(default="flash", metadata={"help": "eager keeps s^2 probs"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the dataset"})
    num_examples: int | None = field(default=None, metadata={"help": "examples in the dataset"})
    avg_len: float | None = field(default=None, metadata={"help": "average tokens per example"})
    tokens_per_s: float | None = field(default=None, metadata={"help": "measured throughput, all devices"})
    stage: Literal["pretrain", "sft"] | None = field(default=None, metadata={"help": "fine-tuning stage: shows the "
                                                     "learning-rate defaults and checks --domain-share"})
    domain_share: float | None = field(default=None, metadata={"help": "share of domain data in the mix (0-1)"})

    def __post_init__(self) -> None:
        for name in ("seq_len", "micro_batch_size", "grad_accum", "world_size", "epochs",
                     "vocab_size", "num_examples", "avg_len", "tokens_per_s"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value <= 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value!r}")
        if (self.num_examples is None) != (self.avg_len is None):
            raise ConfigError("--num-examples and --avg-len go together: give both to count dataset tokens")
        if self.tokens_per_s is not None and self.num_examples is None:
            raise ConfigError("--tokens-per-s needs --num-examples and --avg-len to estimate a duration")
        if self.domain_share is not None and not 0 <= self.domain_share <= 1:
            raise ConfigError(f"--domain-share must be in [0, 1], got {self.domain_share}")
        if self.domain_share is not None and self.stage is None:
            raise ConfigError("--domain-share needs --stage pretrain or sft (the tolerated share differs)")


def build_plan(cfg: ModelConfig, plan: PlanConfig) -> dict[str, Any]:
    """The whole report as plain data (what `--json` prints; the table is rendered from it)."""
    if plan.seq_len > cfg.max_position_embeddings:
        raise ConfigError(f"--seq-len {plan.seq_len} exceeds max_position_embeddings="
                          f"{cfg.max_position_embeddings} of {cfg.source}; lower it or raise it with --model-config")
    params = count_parameters(cfg)
    mem = training_memory(cfg, micro_batch_size=plan.micro_batch_size, seq_len=plan.seq_len,
                          precision=plan.precision, optimizer=plan.optimizer, world_size=plan.world_size,
                          gradient_checkpointing=plan.gradient_checkpointing, zero_stage=plan.zero_stage,
                          attention=plan.attention)
    kv_dtype = DTYPE_BYTES[plan.precision]
    flops = training_flops_per_token(cfg, plan.seq_len)
    report: dict[str, Any] = {
        "model": dataclasses.asdict(cfg) | {"head_dim": cfg.head_dim},
        "plan": dataclasses.asdict(plan),
        "parameters": {k: getattr(params, k) for k in ("embedding", "attention", "mlp", "norms", "lm_head",
                                                        "total", "non_embedding")},
        "training_memory_per_device": {
            "bytes_per_param": dataclasses.asdict(mem.bytes_per_param) | {"total": mem.bytes_per_param.total},
            "weights_bytes": mem.weights_bytes, "gradients_bytes": mem.gradients_bytes,
            "optimizer_bytes": mem.optimizer_bytes, "activations_bytes": mem.activations_bytes,
            "total_bytes": mem.total_bytes, "activations_are_estimate": True},
        "compute": {"training_flops_per_token": flops,
                    "tokens_per_optimizer_step": plan.micro_batch_size * plan.seq_len * plan.grad_accum
                    * plan.world_size},
        "inference": {
            "kv_dtype_bytes": kv_dtype,
            "kv_cache_bytes_per_token": kv_cache_bytes_per_token(cfg, kv_dtype),
            "kv_cache_bytes_full_context": kv_cache_bytes_per_token(cfg, kv_dtype) * cfg.max_position_embeddings,
            "weights_bytes": {name: inference_memory(cfg, dtype_bytes=b, context_len=0, batch=1).weights_bytes
                              for name, b in WEIGHT_DTYPE_BYTES.items()},
            # the native engine, fp32 on CPU: a oneDNN-packed second copy of the projections and the LM head
            # (serve --cpu-packed-weights, the default) for batched decode
            "cpu_packed_weights_bytes": 4 * (count_parameters(cfg).attention + count_parameters(cfg).mlp
                                             + cfg.hidden_size * cfg.vocab_size)},
    }
    if plan.num_examples is not None and plan.avg_len is not None:
        tokens = dataset_tokens(plan.epochs, plan.num_examples, plan.avg_len)
        data: dict[str, Any] = {"tokens": tokens, "training_flops": flops * tokens,
                                "optimizer_steps": math.ceil(tokens / report["compute"]["tokens_per_optimizer_step"])}
        if plan.tokens_per_s is not None:
            data |= {"eta_s": tokens / plan.tokens_per_s, "achieved_flops_per_s": flops * plan.tokens_per_s}
        report["dataset"] = data
    if plan.stage is not None:
        batch = plan.micro_batch_size * plan.grad_accum * plan.world_size
        report["finetune"] = {
            "global_batch_size": batch, "reference_batch_size": REFERENCE_BATCH,
            "learning_rate_full": default_finetune_lr(is_lora=False, global_batch_size=batch),
            "learning_rate_lora": default_finetune_lr(is_lora=True, global_batch_size=batch),
            "max_domain_share": MAX_DOMAIN_SHARE[plan.stage],
            "warnings": [w for w in [domain_share_warning(plan.stage, plan.domain_share)] if w]
            if plan.domain_share is not None else []}
    return report


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _count(n: float, unit: str = "") -> str:
    """3 significant digits: 31.6M (params, tokens) or, with a unit, 177 MFLOP."""
    suffixes = "KMGTPE" if unit else "KMBT"
    for i in range(len(suffixes), 0, -1):
        if n >= 1000**i:
            return f"{n / 1000**i:.3g}{' ' if unit else ''}{suffixes[i - 1]}{unit}"
    return f"{n:.3g}{' ' if unit else ''}{unit}"


def _duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def format_plan(r: dict[str, Any]) -> str:
    m, p, t, c, inf, pl = (r["model"], r["parameters"], r["training_memory_per_device"], r["compute"],
                           r["inference"], r["plan"])
    bpp = t["bytes_per_param"]
    mode = "fp32" if pl["precision"] == "fp32" else f"{pl['precision']} mixed precision"
    lines = [
        f"model: {m['source']}  hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, "
        f"{m['num_attention_heads']} heads / {m['num_key_value_heads']} KV heads (head_dim {m['head_dim']}), "
        f"mlp {m['intermediate_size']}, vocab {m['vocab_size']}, {'tied' if m['tie_word_embeddings'] else 'untied'}",
        "", "parameters (exact)",
        *(f"  {k:<22}{_count(p[k]):>10}" for k in ("embedding", "attention", "mlp", "norms", "lm_head")),
        f"  {'total':<22}{_count(p['total']):>10}   ({p['total']:,})",
        f"  {'non-embedding':<22}{_count(p['non_embedding']):>10}",
        "", f"training memory per device: {mode}, {pl['optimizer']}, ZeRO {pl['zero_stage']}, "
        f"world size {pl['world_size']}",
        f"  {'':<22}{'B/param':>10}{'memory':>14}",
        *(f"  {k:<22}{bpp[k]:>10.2f}{_bytes(t[k + '_bytes']):>14}" for k in ("weights", "gradients", "optimizer")),
        f"  {'activations (est.)':<22}{'':>10}{_bytes(t['activations_bytes']):>14}   micro-batch "
        f"{pl['micro_batch_size']} x seq {pl['seq_len']}, {pl['attention']} attention"
        + (", checkpointed" if pl["gradient_checkpointing"] else ""),
        f"  {'total':<22}{bpp['total']:>10.2f}{_bytes(t['total_bytes']):>14}",
        "  weights/gradients/optimizer are exact; activations are an estimate (attention kernel, fused",
        "  norms/loss and the allocator change them); add ~0.5-1 GiB for the CUDA context and workspaces.",
        "", "compute",
        f"  training FLOPs/token  {_count(c['training_flops_per_token'], 'FLOP')}   (6N + 6·L·s·h, Kaplan 2020)",
        f"  tokens/optimizer step {c['tokens_per_optimizer_step']:,}   (micro-batch x seq x grad-accum x world)",
        "", f"inference (KV cache at {inf['kv_dtype_bytes']} B/element)",
        f"  KV cache per token    {_bytes(inf['kv_cache_bytes_per_token'])}",
        f"  {'KV cache, ' + str(m['max_position_embeddings']) + ' tokens':<22}"
        f"{_bytes(inf['kv_cache_bytes_full_context'])} per sequence",
        "  weights               " + ", ".join(f"{k} {_bytes(v)}" for k, v in inf["weights_bytes"].items())
        + "  (int: no scales)",
        f"  + packed copy         {_bytes(inf['cpu_packed_weights_bytes'])}   (native engine, fp32 on CPU, for "
        "batched decode; off: serve --no-cpu-packed-weights)",
    ]
    if "dataset" in r:
        d = r["dataset"]
        lines += ["", "dataset",
                  f"  tokens                {_count(d['tokens'])}   (epochs {pl['epochs']:g} x {pl['num_examples']:,} "
                  f"examples x {pl['avg_len']:g} tokens)",
                  f"  optimizer steps       {d['optimizer_steps']:,}",
                  f"  training FLOPs        {_count(d['training_flops'], 'FLOP')}"]
        if "eta_s" in d:
            lines.append(f"  ETA                   {_duration(d['eta_s'])} at {_count(pl['tokens_per_s'])} tokens/s"
                         f" ({_count(d['achieved_flops_per_s'], 'FLOP/s')} achieved)")
    if "finetune" in r:
        f = r["finetune"]
        lines += ["", f"fine-tuning ({pl['stage']})",
                  f"  learning rate         full {f['learning_rate_full']:.2e}, LoRA {f['learning_rate_lora']:.2e}"
                  f"   (2e-5 / 1e-4 at batch {f['reference_batch_size']}, x sqrt({f['global_batch_size']}/"
                  f"{f['reference_batch_size']}))",
                  f"  domain data           at most ~{f['max_domain_share']:.0%} of the mix", *f["warnings"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    plan = config_from_args(PlanConfig, args)
    cfg = resolve_model_config(plan.preset, plan.model_config, plan.vocab_size)
    report = build_plan(cfg, plan)
    print(json.dumps(report, indent=2) if getattr(args, "json", False) else format_plan(report))
    return 0


def add_command(sub: argparse._SubParsersAction) -> None:
    parser = add_subcommand(sub, "plan", help="parameters, training/inference memory and FLOPs for a model size",
                            example="lmforge plan --preset base --seq-len 2048 --micro-batch-size 4 "
                                    "--num-examples 100000 --avg-len 700 --tokens-per-s 40000")
    add_config_arguments(parser, PlanConfig)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)
