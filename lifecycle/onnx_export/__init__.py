"""`lmforge export --format onnx`: a checkpoint as an ONNX decoder with KV cache, parity-checked against transformers.

    graph.py     the traced decoder (inputs/outputs, dynamic shapes) and its genai_config.json
    quantize.py  fp16, int8 (dynamic quantization), int4 (MatMulNBits) from the fp32 graph
    runner.py    plain onnxruntime: greedy through the cache, whole-sequence logits, perplexity
    export.py    the export as a checkpoint: parity, perplexity, manifest, atomic publish; load_onnx_export
    cli.py       the flags `lmforge export` adds for it

Served by serve/backends/onnxruntime.py (`lmforge serve --backend onnxruntime`).
"""
