"""The standard on-disk formats, written as lmforge checkpoints (manifest with QuantConfig and parent).

- GPTQ (AutoGPTQ/GPTQModel "gptq" = v1 checkpoint format; loaded by transformers with gptqmodel +
  optimum, and by vLLM): per linear `qweight` (K·bits/32, N) int32, `qzeros` (G, N·bits/32) int32
  holding zero - 1, `scales` (G, N) fp16, `g_idx` (K,) int32; `quantization_config` in config.json.
- bitsandbytes 8-bit (LLM.int8 serialization, `load_in_8bit`): `weight` (N, K) int8 and `SCB` (N,) the
  per-row absmax (scale = SCB / 127). The same tensors are a weight-only per-channel int8 linear, which
  is what our engine runs; transformers runs them as LLM.int8 (with outlier decomposition).
- bitsandbytes NF4 (`load_in_4bit`, QLoRA): `weight` (N·K/2, 1) uint8 codes, `weight.absmax`,
  `weight.quant_map`, with double quant `weight.nested_absmax` / `nested_quant_map`, and the JSON of the
  rest in `weight.quant_state.bitsandbytes__nf4`.
Tensors that are not quantized (embeddings, norms, and the LM head unless --quantize-lm-head) are stored in fp16,
as GPTQ releases are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lifecycle.checkpoint import Checkpoint, save_checkpoint
from lifecycle.errors import CheckpointError
from quant import primitives as P
from quant.config import QuantConfig
from quant.gptq import GPTQResult

NF4_STATE_KEY = "quant_state.bitsandbytes__nf4"


def _lmforge_version() -> str:
    from lifecycle import __version__

    return __version__


def quantization_config(cfg: QuantConfig) -> dict[str, Any]:
    """config.json's `quantization_config` for each method, as transformers reads it."""
    if cfg.method in ("gptq", "rtn"):
        return {"quant_method": "gptq", "bits": cfg.bits, "group_size": cfg.group_size or -1,
                "desc_act": cfg.act_order, "sym": cfg.sym, "static_groups": cfg.static_groups,
                "true_sequential": cfg.true_sequential, "damp_percent": cfg.damp_percent,
                "checkpoint_format": "gptq", "pack_dtype": "int32", "lm_head": cfg.quantize_lm_head,
                "meta": {"quantizer": [f"lmforge:{_lmforge_version()}"], "method": cfg.method}}
    common = {"quant_method": "bitsandbytes", "llm_int8_skip_modules": [] if cfg.quantize_lm_head else ["lm_head"]}
    if cfg.method == "int8":
        return {**common, "load_in_8bit": True, "load_in_4bit": False, "llm_int8_threshold": 6.0}
    return {**common, "load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": cfg.double_quant, "bnb_4bit_compute_dtype": "float32",
            "bnb_4bit_quant_storage": "uint8"}


def gptq_tensors(results: dict[str, GPTQResult], bits: int) -> dict[str, torch.Tensor]:
    state = {}
    for name, res in results.items():
        for key, t in P.pack_gptq(res.q, res.scales, res.zeros, res.g_idx, bits).items():
            state[f"{name}.{key}"] = t
    return state


def int8_tensors(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Symmetric per-row int8: q = round(127 · w / absmax), as bitsandbytes' `int8_vectorwise_quant`."""
    state = {}
    for name, w in weights.items():
        absmax = w.float().abs().max(dim=1).values.clamp(min=torch.finfo(torch.float32).tiny)  # (N,)
        q = torch.round(w.float() * (127.0 / absmax[:, None])).clamp(-127, 127).to(torch.int8)
        state[f"{name}.weight"] = q
        state[f"{name}.SCB"] = absmax
    return state


def nf4_tensors(weights: dict[str, torch.Tensor], *, double_quant: bool, blocksize: int) -> dict[str, torch.Tensor]:
    state = {}
    for name, w in weights.items():
        packed, absmax = P.quantize_nf4(w, blocksize)
        meta: dict[str, Any] = {"quant_type": "nf4", "blocksize": blocksize, "dtype": "float16", "shape": list(w.shape)}
        state[f"{name}.weight"] = packed
        state[f"{name}.weight.quant_map"] = P.NF4_TABLE.clone()
        if double_quant:
            codes, nested, offset = P.double_quantize_absmax(absmax, 256)
            state[f"{name}.weight.absmax"] = codes
            state[f"{name}.weight.nested_absmax"] = nested
            state[f"{name}.weight.nested_quant_map"] = P.dynamic_map()
            meta.update(nested_blocksize=256, nested_dtype="float32", nested_offset=float(offset))
        else:
            state[f"{name}.weight.absmax"] = absmax
        state[f"{name}.weight.{NF4_STATE_KEY}"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return state


class _StateDictModel:
    """What `save_checkpoint` needs of a model: save_pretrained and parameters, for a prepared state dict."""

    def __init__(self, state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        self.state, self.config = state, config

    def save_pretrained(self, directory: Path, safe_serialization: bool = True) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state.items()}, str(directory / "model.safetensors"),
                  metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")

    def parameters(self):
        return iter(self.state.values())


def write_quantized(out_dir: str | Path, parent: Checkpoint, model, cfg: QuantConfig, *,
                    results: dict[str, GPTQResult] | None, metrics: dict[str, Any] | None = None,
                    recipe_config: dict[str, Any] | None = None, overwrite: bool = False) -> Checkpoint:
    """Write the quantized checkpoint of `model` (the parent's weights; for gptq/rtn `results` holds the integer
    form of every quantized linear) atomically; the manifest records cfg and the parent."""
    from quant.sequential import linear_names

    names = linear_names(model, lm_head=cfg.quantize_lm_head)
    full = {k: v.detach() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        full.pop("lm_head.weight", None)  # transformers re-ties it on load
    state = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in full.items()
             if k.removesuffix(".weight") not in names and k.removesuffix(".bias") not in names}
    for n in names:  # biases stay fp16 beside the quantized weight
        if f"{n}.bias" in full:
            state[f"{n}.bias"] = full[f"{n}.bias"].to(torch.float16)
    weights = {n: full[f"{n}.weight"].float() for n in names}
    if cfg.method in ("gptq", "rtn"):
        assert results is not None and set(results) == set(names)
        state.update(gptq_tensors(results, cfg.bits))
    elif cfg.method == "int8":
        state.update(int8_tensors(weights))
    else:
        state.update(nf4_tensors(weights, double_quant=cfg.double_quant, blocksize=cfg.nf4_blocksize))
    config = json.loads((parent.path / "config.json").read_text())
    config["quantization_config"] = quantization_config(cfg)
    config["dtype"] = "float16"
    config.pop("torch_dtype", None)
    return save_state(out_dir, parent, state, config, cfg, recipe_config=recipe_config, metrics=metrics,
                      overwrite=overwrite)


def save_state(out_dir: str | Path, parent: Checkpoint, state: dict[str, torch.Tensor], config: dict[str, Any],
               cfg: QuantConfig, *, recipe_config: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
               overwrite: bool = False) -> Checkpoint:
    """A prepared state dict + config.json as an lmforge checkpoint: the parent's tokenizer, a greedy
    generation_config.json, the manifest with the QuantConfig and parent, all written atomically."""
    adapter = type(config.get("architectures", ["LlamaForCausalLM"])[0], (_StateDictModel,), {})(state, config)
    return save_checkpoint(out_dir, adapter, parent.load_tokenizer(), recipe="quantize",
                           recipe_config=recipe_config or {"quant": cfg.to_dict()}, parent=parent,
                           dataset_manifest_hash=(parent.manifest or {}).get("dataset_manifest_hash"),
                           metrics=metrics, quantization={**cfg.to_dict(), "format": config["quantization_config"]},
                           overwrite=overwrite)


# ------------------------------------------------------------------------------------ reading


def method_of(qconfig: dict[str, Any], source: str) -> tuple[str, int]:
    """(format, bits) of a `quantization_config`: ("gptq", b), ("int8", 8) or ("nf4", 4)."""
    qm = qconfig.get("quant_method")
    if qm == "gptq":
        if qconfig.get("checkpoint_format", "gptq") != "gptq":
            raise CheckpointError(f"{source}: GPTQ checkpoint_format {qconfig.get('checkpoint_format')!r}; "
                                  "only the standard 'gptq' (v1) layout is read")
        bits = int(qconfig.get("bits", 4))
        P.check_bits(bits, field=f"{source}: quantization_config.bits")
        return "gptq", bits
    if qm == "bitsandbytes" and qconfig.get("load_in_8bit"):
        return "int8", 8
    if qm == "bitsandbytes" and qconfig.get("load_in_4bit") and qconfig.get("bnb_4bit_quant_type") == "nf4":
        return "nf4", 4
    raise CheckpointError(f"{source}: quantization_config {json.dumps(qconfig)[:120]} is not one lmforge reads "
                          "(gptq, bitsandbytes int8, bitsandbytes nf4)")


def _need(state: dict[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"{source}: quantized tensor {key!r} is missing")
    return state[key]


def read_grid(state: dict[str, torch.Tensor], name: str, bits: int, source: str):
    """GPTQ tensors of one linear -> (q (N, K), scales (N, G), zeros (N, G), g_idx (K,))."""
    t = {k: _need(state, f"{name}.{k}", source) for k in ("qweight", "qzeros", "scales", "g_idx")}
    return P.unpack_gptq(t, bits)


def read_nf4_codes(state: dict[str, torch.Tensor], name: str, source: str):
    """One NF4 linear -> (packed codes, absmax fp32 (double quant undone), shape, blocksize)."""
    meta = json.loads(bytes(_need(state, f"{name}.weight.{NF4_STATE_KEY}", source).tolist()).decode())
    absmax = _need(state, f"{name}.weight.absmax", source)
    if "nested_offset" in meta:
        absmax = P.dequantize_absmax(absmax, state[f"{name}.weight.nested_absmax"],
                                     torch.tensor(meta["nested_offset"]), meta["nested_blocksize"])
    return state[f"{name}.weight"], absmax.float(), tuple(meta["shape"]), int(meta["blocksize"])


def read_nf4(state: dict[str, torch.Tensor], name: str, source: str) -> torch.Tensor:
    """Dequantized (N, K) fp32 weight of one NF4 linear."""
    return P.dequantize_nf4(*read_nf4_codes(state, name, source))


def dequantized_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain fp32 state dict of a quantized checkpoint (for perplexity in any framework)."""
    from safetensors.torch import load_file

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    fmt, bits = method_of(config["quantization_config"], str(path / "config.json"))
    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    out: dict[str, torch.Tensor] = {}
    markers = (".qweight", ".SCB", f".weight.{NF4_STATE_KEY}")  # one per quantized linear
    bases = {k[:-len(m)] for k in state for m in markers if k.endswith(m)}
    for name in bases:
        if fmt == "gptq":
            q, s, z, g = read_grid(state, name, bits, str(path))
            out[f"{name}.weight"] = P.dequantize_groups(q, s, z, g)
        elif fmt == "int8":
            out[f"{name}.weight"] = state[f"{name}.weight"].float() * (state[f"{name}.SCB"].float() / 127)[:, None]
        else:
            out[f"{name}.weight"] = read_nf4(state, name, str(path))
    for k, v in state.items():
        owner = next((b for b in bases if k.startswith(b + ".")), None)
        if owner is None or k == f"{owner}.bias":
            out[k] = v.float() if v.is_floating_point() else v
    return out
