"""A lean Llama/Qwen2 decoder for serving: transformers' weights, our paged KV cache.

The math follows transformers' `LlamaForCausalLM` / `Qwen2ForCausalLM` exactly (RMSNorm in fp32,
rotate-half RoPE, SwiGLU, grouped-query attention) so greedy outputs match token for token (tested).
What differs is the layout: the step's tokens of all sequences are one flat batch, Q/K/V and
gate/up are fused into one matmul each, and attention reads K/V through block tables.
Weights are read from safetensors only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lifecycle.errors import CheckpointError
from serve.worker import kernels as cpu_kernels
from serve.worker.attention import AttentionMetadata, paged_attention, write_kv


@dataclass(frozen=True)
class DecoderConfig:
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool

    @classmethod
    def from_checkpoint_config(cls, config: dict[str, Any], source: str) -> "DecoderConfig":
        model_type = config.get("model_type")
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise CheckpointError(f"{source}: rope type {rope_type!r} is not supported by the native engine yet; "
                                  "serve it with --backend vllm")
        heads = config["num_attention_heads"]
        return cls(
            model_type=model_type,
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            intermediate_size=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(config.get("rope_theta") or rope.get("rope_theta", 10000.0)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            # Qwen2 always has Q/K/V biases; Llama has them only with attention_bias.
            qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
        )


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # (hidden,)
    # The four matrices are tensors, or quant.linear.QuantLinear modules for a quantized checkpoint.
    qkv: torch.Tensor  # ((heads + 2 * kv_heads) * head_dim, hidden): q, k, v stacked
    qkv_bias: torch.Tensor | None
    o: torch.Tensor  # (hidden, heads * head_dim)
    post_norm: torch.Tensor  # (hidden,)
    gate_up: torch.Tensor  # (2 * intermediate, hidden): gate, up stacked
    down: torch.Tensor  # (hidden, intermediate)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


class LlamaDecoder:
    """Weights + forward. Stateless across steps: the KV cache is passed in."""

    def __init__(self, cfg: DecoderConfig, state: dict[str, torch.Tensor], *, device: torch.device,
                 dtype: torch.dtype, source: str = "checkpoint", use_cpu_kernels: bool = True,
                 quantization: dict[str, Any] | None = None, packed_weights: bool = True,
                 q4_activations: str | None = None) -> None:
        self.cfg, self.device, self.dtype = cfg, device, dtype
        # A quantized checkpoint (config.json `quantization_config`): its linears become quant/linear.py modules
        # (called instead of F.linear / linear_small_m); everything else runs as usual.
        quant = None
        if quantization is not None:
            from quant.linear import QuantizedWeights

            quant = QuantizedWeights(state, quantization, source=source, dtype=dtype, q4_activations=q4_activations)
        # Our C kernels (serve/worker/kernels) cover fp32 on CPU; everything else runs on torch ops.
        self.kernels = None
        if use_cpu_kernels and device.type == "cpu" and dtype == torch.float32:
            self.kernels = cpu_kernels.load()
        if self.kernels is not None:
            self.kernel_path = "lmforge CPU kernels (paged attention in place, small-batch linear)"
        elif device.type == "cpu" and dtype == torch.float32 and use_cpu_kernels:
            self.kernel_path = f"torch ops ({cpu_kernels.status().reason})"
        else:
            self.kernel_path = "torch ops"

        def take(name: str) -> torch.Tensor:
            if name not in state:
                raise CheckpointError(f"{source}: weight {name!r} is missing")
            return state[name].to(device=device, dtype=dtype)

        self.embed = take("model.embed_tokens.weight")  # (vocab, hidden)
        if quant is not None and quant.holds("lm_head"):  # `lmforge quantize --quantize-lm-head`
            self.lm_head = quant.linear(["lm_head"])
        else:
            self.lm_head = self.embed if cfg.tie_word_embeddings or "lm_head.weight" not in state else take("lm_head.weight")
        self.final_norm = take("model.norm.weight")

        def linear(prefix: str, names: list[str]):
            if quant is not None and quant.is_quantized(prefix + names[0]):
                return quant.linear([prefix + n for n in names])
            return torch.cat([take(prefix + n + ".weight") for n in names])

        self.layers: list[LayerWeights] = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            bias = None
            if cfg.qkv_bias:
                bias = torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            self.layers.append(LayerWeights(
                input_norm=take(p + "input_layernorm.weight"),
                qkv=linear(p, [f"self_attn.{n}_proj" for n in "qkv"]),
                qkv_bias=bias,
                o=linear(p, ["self_attn.o_proj"]),
                post_norm=take(p + "post_attention_layernorm.weight"),
                gate_up=linear(p, ["mlp.gate_proj", "mlp.up_proj"]),
                down=linear(p, ["mlp.down_proj"]),
            ))
        if quant is not None:
            self.kernel_path += f" with quantized linears: {quant.describe()}"
        # RoPE tables, as transformers' default rotary embedding: inv_freq over even dims, cos/sin of
        # cat(freqs, freqs) in fp32, cast to the activation dtype when applied.
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float().to(device)
                                             / cfg.head_dim))
        positions = torch.arange(cfg.max_position_embeddings, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # (max_pos, head_dim / 2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (max_pos, head_dim)
        self.rope_cos, self.rope_sin = emb.cos(), emb.sin()
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        # The kernels' one-call forward for steps of few rows reads the weights through their addresses;
        # self.layers keeps the tensors alive (and unmoved: nothing reassigns them after this point).
        self._layer_ptrs = None
        if self.kernels is not None and all(_is_plain_f32(w) for layer in self.layers for w in
                                            (layer.input_norm, layer.qkv, layer.o, layer.post_norm, layer.gate_up,
                                             layer.down)):
            self._layer_ptrs = torch.tensor([[layer.input_norm.data_ptr(), layer.qkv.data_ptr(),
                                              layer.qkv_bias.data_ptr() if layer.qkv_bias is not None else 0,
                                              layer.o.data_ptr(), layer.post_norm.data_ptr(),
                                              layer.gate_up.data_ptr(), layer.down.data_ptr()]
                                             for layer in self.layers], dtype=torch.int64)
        # A quantized model's projections as descriptors for the same one-call forward (quant/linear.py's
        # few_rows_descriptor): its steps of few rows then skip ~10 Python calls per layer, as fp32 models do.
        self._proj_descs = self._quantized_projection_descriptors()
        if self._proj_descs is not None:
            self.kernel_path += "; steps of few rows in one call with the quantized projections"
        # Steps of 9 to PACKED_MAX_ROWS rows (batched decode) run the plain fp32 projections and the LM head on
        # oneDNN-packed copies (onednn_packed): torch's F.linear re-lays out the weight for every call, which at
        # these row counts costs as much as the multiply (docs/BENCHMARKS.md, issue 3, session 11).
        self._packed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if packed_weights and self.kernels is not None:
            self._packed = onednn_packed([self.lm_head] + [w for layer in self.layers for w in
                                                           (layer.qkv, layer.o, layer.gate_up, layer.down)])
            if self._packed:
                self.kernel_path += f"; oneDNN-packed weights for steps of {cpu_kernels.MAX_SMALL_M + 1}-" \
                                    f"{PACKED_MAX_ROWS} rows"
        self._kv_ptrs: tuple[list, torch.Tensor] | None = None  # (the kv_caches list, its addresses)
        # compact_few_row_weights(): bf16 copies of the projections and LM head for steps of few rows
        self._compact: dict[str, Any] | None = None

    def _quantized_projection_descriptors(self) -> torch.Tensor | None:
        """(num_layers, 4, 7) int64 descriptors of qkv, o, gate_up, down for a model with quantized linears whose
        kernels the one-call forward can run (fp32 tensors or LowbitLinear without act-order); sets _layer_ptrs'
        norm and bias addresses. None where any projection or norm cannot take that path."""
        if self.kernels is None or self._layer_ptrs is not None or not all(
                _is_plain_f32(w) for layer in self.layers for w in (layer.input_norm, layer.post_norm)):
            return None
        descs = []
        for layer in self.layers:
            row = []
            for w in (layer.qkv, layer.o, layer.gate_up, layer.down):
                if isinstance(w, torch.Tensor):
                    d = [0, 0, 0, w.data_ptr(), 0, 0, 0] if _is_plain_f32(w) else None
                else:
                    d = getattr(w, "few_rows_descriptor", lambda: None)()
                if d is None:
                    return None
                row.append(d)
            descs.append(row)
        self._layer_ptrs = torch.tensor([[layer.input_norm.data_ptr(), 0,
                                          layer.qkv_bias.data_ptr() if layer.qkv_bias is not None else 0, 0,
                                          layer.post_norm.data_ptr(), 0, 0] for layer in self.layers], dtype=torch.int64)
        return torch.tensor(descs, dtype=torch.int64)

    def compact_few_row_weights(self) -> bool:
        """Run steps of few rows (a draft model's passes) on bfloat16 copies of the four projections of every
        layer and of the LM head: a decode step of few rows streams every weight once, so half the bytes is
        up to half the time. Prefill and large steps keep the fp32 weights; activations, norms and sums stay
        fp32. Only for the one-call kernel path (fp32 CPU model, kernels built); returns whether it took.
        For a draft model this changes which tokens are proposed, never the output: the target verifies."""
        if self._layer_ptrs is None or self._proj_descs is not None or not _is_plain_f32(self.lm_head):
            return False
        copies = [[layer.qkv.to(torch.bfloat16), layer.o.to(torch.bfloat16), layer.gate_up.to(torch.bfloat16),
                   layer.down.to(torch.bfloat16)] for layer in self.layers]  # each (n, k), contiguous
        ptrs = self._layer_ptrs.clone()
        for row, (qkv, o, gate_up, down) in zip(ptrs, copies):
            row[1], row[3], row[5], row[6] = qkv.data_ptr(), o.data_ptr(), gate_up.data_ptr(), down.data_ptr()
        self._compact = {"layers": copies, "layer_ptrs": ptrs, "lm_head": self.lm_head.to(torch.bfloat16)}
        self.kernel_path += "; few-row steps on bf16 weight copies"
        return True

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: torch.device, dtype: torch.dtype | None = None,
                        use_cpu_kernels: bool = True, packed_weights: bool = True,
                        q4_activations: str | None = None) -> "LlamaDecoder":
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        cfg = DecoderConfig.from_checkpoint_config(config, str(path / "config.json"))
        if dtype is None:
            dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        return cls(cfg, _load_state_dict(path), device=device, dtype=dtype, source=str(path),
                   use_cpu_kernels=use_cpu_kernels, quantization=config.get("quantization_config"),
                   packed_weights=packed_weights, q4_activations=q4_activations)

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, int, int]:
        return (num_blocks * block_size, self.cfg.num_kv_heads, self.cfg.head_dim)

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """F.linear; a few rows (decode of one or a few sequences) go to the weight-streaming kernel."""
        if not isinstance(weight, torch.Tensor):  # a quantized linear (quant/linear.py)
            return weight(x, bias)
        if self.kernels is not None and x.shape[0] <= cpu_kernels.MAX_SMALL_M:
            return self.kernels.linear_small_m(x.contiguous(), weight, bias)
        packed = self._packed_weight(x, weight)
        if packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
        return F.linear(x, weight, bias)

    def _packed_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        """The oneDNN-packed copy of `weight` when this step's rows are in the range it serves."""
        if self._packed and x.shape[0] <= PACKED_MAX_ROWS:
            entry = self._packed.get(weight.data_ptr())
            if entry is not None and entry[0] is weight:  # the very tensor it was packed from
                return entry[1]
        return None

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)
        return weight * xf.to(x.dtype)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: (num_tokens, heads, head_dim); cos/sin: (num_tokens, 1, head_dim)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: (num_tokens,). Returns final hidden states (num_tokens, hidden)."""
        if self.kernels is not None:
            return self._forward_kernels(input_ids, positions, kv_caches, meta)
        cfg = self.cfg
        num_q, num_kv, hd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.head_dim
        x = self.embed[input_ids]  # (T, hidden)
        cos = self.rope_cos[positions].to(x.dtype)[:, None, :]  # (T, 1, head_dim)
        sin = self.rope_sin[positions].to(x.dtype)[:, None, :]
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            h = self._rms_norm(x, layer.input_norm)
            qkv = self._linear(h, layer.qkv, layer.qkv_bias)  # (T, (heads + 2 kv_heads) * head_dim)
            q = qkv[:, :num_q].view(-1, cfg.num_heads, hd)  # (T, heads, head_dim)
            k = qkv[:, num_q:num_q + num_kv].view(-1, cfg.num_kv_heads, hd)  # (T, kv_heads, head_dim)
            v = qkv[:, num_q + num_kv:].reshape(-1, cfg.num_kv_heads, hd)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
            attn = paged_attention(q, k_cache, v_cache, meta, self.scale)  # (T, heads, head_dim)
            x = x + self._linear(attn.reshape(-1, num_q), layer.o)
            h = self._rms_norm(x, layer.post_norm)
            gate, up = self._linear(h, layer.gate_up).chunk(2, dim=-1)  # (T, intermediate) each
            x = x + self._linear(F.silu(gate) * up, layer.down)
        return self._rms_norm(x, self.final_norm)

    def _forward_kernels(self, input_ids: torch.Tensor, positions: torch.Tensor,
                         kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata) -> torch.Tensor:
        """The same math with our CPU kernels: ~10 calls per layer instead of ~30 eager ops (per-op overhead is
        most of a small model's single-stream decode), RoPE and the KV write in place on the fused QKV output,
        residual adds folded into the output projections."""
        cfg, kern = self.cfg, self.kernels
        assert kern is not None
        num_q, num_kv, hd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.head_dim
        eps, inter = cfg.rms_norm_eps, cfg.intermediate_size
        few_rows = input_ids.shape[0] <= cpu_kernels.MAX_SMALL_M
        x = self.embed[input_ids]  # (T, hidden), a copy: updated in place below
        if few_rows and self._layer_ptrs is not None and len(meta.kernel_seqs) == len(meta.query_lens):
            compact = self._compact
            return kern.forward_few_rows(
                x, compact["layer_ptrs"] if compact else self._layer_ptrs, self._kv_pointers(kv_caches),
                weights_bf16=compact is not None, proj_descs=self._proj_descs, num_heads=cfg.num_heads,
                num_kv_heads=cfg.num_kv_heads, head_dim=hd, intermediate_size=inter, eps=eps, cos=self.rope_cos,
                sin=self.rope_sin, positions=positions, slots=meta.slot_mapping, block_tables=meta.kernel_block_tables,
                query_starts=meta.kernel_query_starts, query_lens=meta.kernel_query_lens,
                seq_lens=meta.kernel_seq_lens, block_size=meta.block_size, scale=self.scale,
                final_norm=self.final_norm)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            h = kern.rms_norm(x, layer.input_norm, eps)
            qkv = self._linear(h, layer.qkv, layer.qkv_bias)  # (T, (heads + 2 kv_heads) * head_dim)
            kern.rope_(qkv, cfg.num_heads + cfg.num_kv_heads, hd, self.rope_cos, self.rope_sin, positions)  # q, k
            kern.write_kv(qkv, num_q, num_q + num_kv, k_cache, v_cache, meta.slot_mapping)
            q = qkv[:, :num_q].view(-1, cfg.num_heads, hd)  # (T, heads, head_dim), rows strided
            attn = paged_attention(q, k_cache, v_cache, meta, self.scale, kern).view(-1, num_q)  # (T, heads * hd)
            if not isinstance(layer.o, torch.Tensor):  # quantized (quant/linear.py)
                x += layer.o(attn)
            elif few_rows:
                kern.linear_small_m(attn, layer.o, out=x)  # x += attn @ o^T
            elif (packed := self._packed_weight(attn, layer.o)) is not None:
                x += torch.ops.mkldnn._linear_pointwise(attn, packed, None, "none", [], "")
            else:
                x.addmm_(attn, layer.o.t())
            h = kern.rms_norm(x, layer.post_norm, eps)
            gate_up = self._linear(h, layer.gate_up)  # (T, 2 * intermediate)
            if not isinstance(layer.down, torch.Tensor):
                x += layer.down(kern.silu_mul(gate_up) if few_rows else F.silu(gate_up[:, :inter]) * gate_up[:, inter:])
            elif few_rows:
                kern.linear_small_m(kern.silu_mul(gate_up), layer.down, out=x)
            else:  # torch's vectorised exp beats the kernel's scalar one over thousands of rows
                act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
                if (packed := self._packed_weight(act, layer.down)) is not None:
                    x += torch.ops.mkldnn._linear_pointwise(act, packed, None, "none", [], "")
                else:
                    x.addmm_(act, layer.down.t())
        return kern.rms_norm(x, self.final_norm, eps)

    def _kv_pointers(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """(num_layers, 2) addresses of the caches, built once per caches list (the runner keeps one)."""
        if self._kv_ptrs is None or self._kv_ptrs[0] is not kv_caches:
            for k_cache, v_cache in kv_caches:
                if not (_is_plain_f32(k_cache) and _is_plain_f32(v_cache)):
                    raise ValueError("the CPU kernels need contiguous fp32 KV caches on the CPU")
            self._kv_ptrs = (kv_caches, torch.tensor([[k.data_ptr(), v.data_ptr()] for k, v in kv_caches],
                                                     dtype=torch.int64))
        return self._kv_ptrs[1]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(rows, hidden) -> (rows, vocab) in fp32 (sampling and logprobs want full precision)."""
        if self._compact is not None and hidden.shape[0] <= cpu_kernels.MAX_SMALL_M:
            return self.kernels.linear_small_m(hidden.contiguous(), self._compact["lm_head"])
        return self._linear(hidden, self.lm_head).float()


# Up to this many rows per step the packed copies win (measured, 2 threads, `small` shapes: 1.1-1.5x at 64 rows, the
# LM head most); prefill chunks of hundreds to thousands of rows run as fast on torch's F.linear.
PACKED_MAX_ROWS = 256


def onednn_packed(weights: list[object]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """oneDNN-packed copies of the plain fp32 CPU weights among `weights` (quantized ones are skipped), keyed by
    the weight's address, each with the weight it was packed from (so a lookup can check it is that tensor): a
    second copy of those weights in memory. Empty where torch has no oneDNN (the engine then runs F.linear)."""
    if not torch.backends.mkldnn.is_available():
        return {}
    packed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        for w in weights:
            if _is_plain_f32(w) and w.dim() == 2 and w.data_ptr() not in packed:
                packed[w.data_ptr()] = (w, torch.ops.mkldnn._reorder_linear_weight(w, 64))  # 64: the batch it suits
    except (RuntimeError, AttributeError):  # a torch build without these ops
        return {}
    return packed


def _is_plain_f32(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
