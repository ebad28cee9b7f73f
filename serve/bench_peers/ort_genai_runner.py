"""onnxruntime-genai peer runner: W2 (one stream) on a model exported by its model builder.

Runs under the peers' python (`make peers` -> .venv-peers); only onnxruntime_genai and the standard library.
The export (`ort_genai_export.py`, lmforge's side) happens first; `spec.model` is the exported directory.

    echo '{"workload": "w2", "model": "ONNX_DIR", "prompts": [[5, 6, 7]], "output_len": 16}' \\
        | .venv-peers/bin/python serve/bench_peers/ort_genai_runner.py

Prints one `LMFORGE_PEER_RESULT {...}` line (see runner_io.py).
"""

from __future__ import annotations

import json
import time

if __package__:  # imported as serve.bench_peers.ort_genai_runner
    from .runner_io import RunnerSpec, emit_result, read_spec, stream_stats
else:  # run as a script by the peers' python: this folder is sys.path[0]
    from runner_io import RunnerSpec, emit_result, read_spec, stream_stats


def generate(model, prompt: list[int], output_len: int) -> tuple[float, list[float], list[int]]:
    """Greedy decoding of `output_len` tokens; returns (start, arrival time of each token, token ids)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    # min_length too: with the overlay's empty EOS list it still ends at an EOS/pad id a trained model picks
    params.set_search_options(do_sample=False, max_length=len(prompt) + output_len,
                              min_length=len(prompt) + output_len)
    start = time.perf_counter()
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)  # runs the prefill; the first token is chosen by generate_next_token
    stamps: list[float] = []
    token_ids: list[int] = []
    while len(token_ids) < output_len and not generator.is_done():
        generator.generate_next_token()
        token_ids.append(int(generator.get_next_tokens()[0]))
        stamps.append(time.perf_counter())
    return start, stamps, token_ids


def run(spec: RunnerSpec) -> dict:
    import onnxruntime_genai as og

    if spec.workload != "w2":
        raise SystemExit(f"onnxruntime-genai runs only the single-stream workload w2, not {spec.workload}")
    config = og.Config(spec.model)
    # Ignore EOS like the other engines: with no EOS id, only max_length ends generation (an id outside the
    # vocabulary is refused: "eos_token_id must be in range [0, vocab_size)").
    config.overlay(json.dumps({"model": {"eos_token_id": []}}))
    model = og.Model(config)
    generate(model, spec.warmup_prompt, 8)  # warm-up: allocate, first-run kernels
    start, stamps, token_ids = generate(model, spec.prompts[0], spec.output_len)
    if len(token_ids) != spec.output_len:
        raise SystemExit(f"generated {len(token_ids)} of {spec.output_len} tokens (context length reached?)")
    return stream_stats(start, stamps) | {"token_ids": [token_ids]}


if __name__ == "__main__":
    emit_result(run(read_spec()))
