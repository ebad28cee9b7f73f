"""The decoder graph: a transformers causal LM as one ONNX model with its KV cache as inputs and outputs.

    inputs   input_ids (batch, seq) int64, attention_mask (batch, past_seq + seq) int64,
             position_ids (batch, seq) int64, past_key_values.{i}.key / .value (batch, kv_heads, past_seq, head_dim)
    outputs  logits (batch, seq, vocab), present.{i}.key / .value (batch, kv_heads, past_seq + seq, head_dim)

These are the names and layouts onnxruntime-genai's decoder expects with `past_present_share_buffer: false`
(the present cache is the past one with this step's keys appended), written into genai_config.json
(`genai_config`). Exported with `torch.onnx.export(dynamo=True)` and dynamic batch / sequence / past
dimensions (shared/NOTES.md: optimum's exporter does not support transformers 5). A zero in attention_mask
marks a padding position (left padding works: position_ids carry each row's own positions).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

WEIGHTS_NAME = "model.onnx"
EXTERNAL_DATA_NAME = "model.onnx.data"
GENAI_CONFIG_NAME = "genai_config.json"
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"


def cache_shape(config: dict[str, Any]) -> tuple[int, int, int]:
    """(num_layers, kv_heads, head_dim) of the model's KV cache."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return config["num_hidden_layers"], config.get("num_key_value_heads") or heads, head_dim


def input_names(num_layers: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids"] + [
        name % i for i in range(num_layers) for name in (PAST_KEY, PAST_VALUE)]


def output_names(num_layers: int) -> list[str]:
    return ["logits"] + [name % i for i in range(num_layers) for name in (PRESENT_KEY, PRESENT_VALUE)]


def _decoder_module(model: Any) -> Any:
    """`model` with a flat signature: (ids, mask, positions, [k0, v0, k1, v1, ...]) -> (logits, k0', v0', ...)."""
    import torch
    from transformers import DynamicCache

    class FlatCacheDecoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, past):
            cache = DynamicCache(config=self.model.config)
            for i in range(len(past) // 2):
                cache.update(past[2 * i], past[2 * i + 1], i)  # (batch, kv_heads, past_seq, head_dim)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    return FlatCacheDecoder().eval()


def export_decoder(model: Any, out_dir: Path, *, opset: int) -> Path:
    """Trace `model` (fp32 or fp16, eval mode) into out_dir/model.onnx (+ model.onnx.data); returns the path."""
    import torch

    num_layers, kv_heads, head_dim = cache_shape(model.config.to_dict())
    dtype = next(model.parameters()).dtype
    batch, seq, past_seq = 2, 3, 4  # example shapes; every one of them is dynamic in the graph
    ids = torch.zeros(batch, seq, dtype=torch.long)
    mask = torch.ones(batch, past_seq + seq, dtype=torch.long)
    positions = torch.arange(past_seq, past_seq + seq)[None].expand(batch, seq).contiguous()
    past = [torch.zeros(batch, kv_heads, past_seq, head_dim, dtype=dtype) for _ in range(2 * num_layers)]
    dim_batch, dim_seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    dim_past = torch.export.Dim("past_seq")
    dynamic_shapes = {"input_ids": {0: dim_batch, 1: dim_seq},
                      "attention_mask": {0: dim_batch, 1: torch.export.Dim.AUTO},  # = past_seq + seq
                      "position_ids": {0: dim_batch, 1: dim_seq},
                      "past": [{0: dim_batch, 2: dim_past} for _ in range(2 * num_layers)]}
    # torch.onnx prints its stages and onnx_ir logs every deduplicated constant: the export's bar says enough.
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(_decoder_module(model), (ids, mask, positions, past), dynamo=True,
                                    dynamic_shapes=dynamic_shapes, input_names=input_names(num_layers),
                                    output_names=output_names(num_layers), opset_version=opset, verbose=False)
    path = out_dir / WEIGHTS_NAME
    program.save(str(path), external_data=True)
    return path


def genai_config(config: dict[str, Any], generation: dict[str, Any], *, filename: str = WEIGHTS_NAME) -> dict[str, Any]:
    """onnxruntime-genai's genai_config.json for this graph (its builder's layout, our input/output names)."""
    num_layers, kv_heads, head_dim = cache_shape(config)
    context = int(config.get("max_position_embeddings") or 2048)
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    pad = generation.get("pad_token_id", config.get("pad_token_id"))
    return {
        "model": {
            "bos_token_id": generation.get("bos_token_id", config.get("bos_token_id")),
            "eos_token_id": eos if eos is not None else [],
            "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) and eos else eos or 0),
            "context_length": context, "vocab_size": config["vocab_size"], "type": config["model_type"],
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename, "head_size": head_dim, "hidden_size": config["hidden_size"],
                "num_attention_heads": config["num_attention_heads"], "num_hidden_layers": num_layers,
                "num_key_value_heads": kv_heads,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": PAST_KEY, "past_value_names": PAST_VALUE},
                "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY,
                            "present_value_names": PRESENT_VALUE},
            },
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def write_genai_config(out_dir: Path, config: dict[str, Any], generation: dict[str, Any]) -> None:
    (out_dir / GENAI_CONFIG_NAME).write_text(json.dumps(genai_config(config, generation), indent=2) + "\n")
