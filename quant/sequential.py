"""Layer-by-layer GPTQ/RTN over a transformers Llama-style model (GPTQ paper §5 "Setup").

The calibration sequences go through the model once up to the first decoder layer (a pre-hook
captures that layer's inputs and stops the forward). Then, block by block: hooks on the linears
accumulate H = 2 XᵀX / num_tokens from the block's inputs, the solver quantizes, the weights are
replaced by their dequantized values, and the block's outputs — computed with the quantized weights,
so later blocks calibrate on what they will really see — become the next block's inputs.
True-sequential: within a block q/k/v are quantized first, then o sees the quantized attention,
then gate/up, then down.
"""

from __future__ import annotations

from typing import Any

import torch

from quant.config import QuantConfig
from quant.gptq import GPTQResult, gptq_quantize, rtn_result

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TRUE_SEQUENTIAL = (LINEARS[:3], LINEARS[3:4], LINEARS[4:6], LINEARS[6:])


class _StopForward(Exception):
    pass


def linear_names(model, lm_head: bool = False) -> list[str]:
    """Full names of the linears that are quantized: the decoder layers' (embeddings never; the LM head only when
    asked, `--quantize-lm-head`)."""
    names = [f"model.layers.{i}.{n}" for i in range(len(model.model.layers)) for n in LINEARS]
    return names + ["lm_head"] if lm_head else names


@torch.no_grad()
def capture_layer_inputs(model, calib_ids: torch.Tensor) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Hidden states entering decoder layer 0 and the keyword arguments the model passes it, per sequence."""
    inputs: list[torch.Tensor] = []
    kwargs_list: list[dict[str, Any]] = []

    def hook(module, args, kwargs):
        inputs.append(args[0] if args else kwargs["hidden_states"])  # (1, seq, hidden)
        kwargs_list.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in calib_ids:
            try:
                model(ids[None], use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return inputs, kwargs_list


def _run_layer(layer, inputs, kwargs_list) -> list[torch.Tensor]:
    outs = []
    for x, kw in zip(inputs, kwargs_list):
        out = layer(x, **kw)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


@torch.no_grad()
def quantize_model(model, cfg: QuantConfig, calib_ids: torch.Tensor | None = None,
                   progress: bool = True) -> dict[str, GPTQResult]:
    """Quantize every decoder linear of `model` in place (weights become their dequantized values) and
    return the integer form of each, by full module name. RTN needs no calibration data."""
    from tqdm.auto import tqdm

    # The GPTQ v1 format stores zero - 1, so asymmetric grids keep zero >= 1 (see primitives.grid_params).
    min_zero = 0 if cfg.sym else 1
    results: dict[str, GPTQResult] = {}
    layers = model.model.layers
    if cfg.method == "rtn":
        for i, layer in enumerate(tqdm(layers, desc="rtn", unit="layer", disable=not progress)):
            for n in LINEARS:
                mod = layer.get_submodule(n)
                res = rtn_result(mod.weight.data, bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym,
                                 min_zero=min_zero)
                mod.weight.data = res.dequantize().to(mod.weight.dtype)
                results[f"model.layers.{i}.{n}"] = res
        if cfg.quantize_lm_head:
            w = model.lm_head.weight
            res = rtn_result(w.data, bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, min_zero=min_zero)
            w.data = res.dequantize().to(w.dtype)
            results["lm_head"] = res
        return results
    if cfg.method != "gptq":
        raise ValueError(f"quantize_model handles gptq and rtn, not {cfg.method}")
    assert calib_ids is not None
    inputs, kwargs_list = capture_layer_inputs(model, calib_ids)
    groups = TRUE_SEQUENTIAL if cfg.true_sequential else (LINEARS,)
    for i, layer in enumerate(tqdm(layers, desc="gptq", unit="layer", disable=not progress)):
        for names in groups:
            mods = {n: layer.get_submodule(n) for n in names}
            sums = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in mods.items()}
            counts = dict.fromkeys(names, 0)

            def make_hook(name):
                def hook(module, args, output):
                    x = args[0].reshape(-1, module.in_features).double()  # (tokens, in)
                    sums[name] += x.t() @ x
                    counts[name] += x.shape[0]
                return hook

            handles = [m.register_forward_hook(make_hook(n)) for n, m in mods.items()]
            try:
                _run_layer(layer, inputs, kwargs_list)
            finally:
                for h in handles:
                    h.remove()
            for n, mod in mods.items():
                H = (2 * sums[n] / counts[n]).float()  # (in, in)
                res = gptq_quantize(mod.weight.data, H, bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym,
                                    act_order=cfg.act_order, static_groups=cfg.static_groups,
                                    damp_percent=cfg.damp_percent, block_size=cfg.block_size, min_zero=min_zero)
                mod.weight.data = res.dequantize().to(mod.weight.dtype)
                results[f"model.layers.{i}.{n}"] = res
        inputs = _run_layer(layer, inputs, kwargs_list)  # what the next block sees, after quantization
    if cfg.quantize_lm_head:  # its input: the final norm of what the (quantized) last block outputs
        head = model.lm_head
        H = torch.zeros(head.in_features, head.in_features, dtype=torch.float64)
        count = 0
        for x in inputs:
            h = model.model.norm(x).reshape(-1, head.in_features).double()  # (tokens, hidden)
            H += h.t() @ h
            count += h.shape[0]
        res = gptq_quantize(head.weight.data, (2 * H / count).float(), bits=cfg.bits, group_size=cfg.group_size,
                            sym=cfg.sym, act_order=cfg.act_order, static_groups=cfg.static_groups,
                            damp_percent=cfg.damp_percent, block_size=cfg.block_size, min_zero=min_zero)
        head.weight.data = res.dequantize().to(head.weight.dtype)
        results["lm_head"] = res
    return results
