"""The `--format onnx` flags of `lmforge export` (lifecycle/export.py owns the subcommand)."""

from __future__ import annotations

from typing import Any

from lifecycle.errors import ConfigError


def add_arguments(parser: Any) -> None:
    from lifecycle.onnx_export.export import DEFAULT_OPSET
    from lifecycle.onnx_export.quantize import DTYPES, QUANTIZATIONS

    group = parser.add_argument_group("--format onnx (CHECKPOINT -> ONNX decoder with KV cache, parity-checked)")
    group.add_argument("--dtype", choices=DTYPES, default="fp32", help="precision of the ONNX graph (default fp32)")
    group.add_argument("--quantize", choices=QUANTIZATIONS, default=None,
                       help="int8: onnxruntime dynamic quantization; int4: MatMulNBits (4-bit blocks of 32)")
    group.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    group.add_argument("--eval-data", nargs="+", default=[], metavar="FILE",
                       help="held-out text for the perplexity of fp16/int8/int4 exports (default: the checkpoint's own)")
    group.add_argument("--parity-prompts", type=int, default=4, help="prompts greedy parity runs on (default 4)")
    group.add_argument("--parity-tokens", type=int, default=32, help="greedy tokens per parity prompt (default 32)")


def run(args: Any) -> int:
    from lifecycle.onnx_export.export import OnnxExportConfig, export_onnx

    if args.base is not None:
        raise ConfigError("--base: only for merging a LoRA adapter (--format merge)")
    cfg = OnnxExportConfig(checkpoint=args.adapter, output=args.output, dtype=args.dtype, quantize=args.quantize,
                           opset=args.opset, eval_data=list(args.eval_data), parity_prompts=args.parity_prompts,
                           parity_tokens=args.parity_tokens, overwrite=args.overwrite)
    path, metrics = export_onnx(cfg)
    parity = metrics["parity_fp32"]
    print(f"onnx export: {path}")
    print(f"  parity fp32 vs transformers: greedy tokens identical on {parity['num_prompts']} prompts x "
          f"{parity['num_tokens']} tokens, max |Δlogit| {parity['max_abs_logit_diff']:.2e}")
    if "drift" in metrics:
        drift, ppl = metrics["drift"], metrics["perplexity"]
        label = cfg.quantize or cfg.dtype
        print(f"  {label} vs transformers fp32: {drift['identical_fraction']:.0%} of prompts identical, "
              f"{drift['prefix_fraction']:.1%} of tokens before the first difference, max |Δlogit| "
              f"{drift['max_abs_logit_diff']:.3g}")
        print(f"  perplexity ({ppl['num_blocks']} x {ppl['seq_len']} held-out tokens): {ppl['before']:.3f} -> "
              f"{ppl['after']:.3f} ({ppl['relative_change']:+.2%})")
    print(f"  onnxruntime-genai generator: same greedy tokens ({metrics['genai_greedy_identical']})")
    return 0
