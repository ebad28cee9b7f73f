"""onnxruntime-genai side of `python -m quant.cpu_time_bench --ort-genai`: greedy decode timed in this process's CPU
time, one round per request, so the caller can interleave our engine's rounds with these.

Runs under the peers' python (`make peers` -> .venv-peers): only onnxruntime_genai and the standard library.
The model is an onnxruntime-genai export (its model builder). Intra- and inter-op threads are set to 1 through the
genai_config overlay, so `time.process_time` of this process is what the decode costs one core.

Protocol (one JSON object per line): argv[1] = model dir; it prints {"ready": true, ...} once loaded, then reads
requests {"prompt": [ids], "tokens": n} from stdin and answers each with {"cpu_s": s, "tokens": [ids]}, where
cpu_s covers the n - 1 decode steps after the first token (the prefill that produces the first token is not
counted, as on our side). EOF ends it.
"""

from __future__ import annotations

import json
import sys
import time


def load(model_dir: str):
    import onnxruntime_genai as og

    config = og.Config(model_dir)
    # One thread, as our engine in the caller; no EOS, so only max_length ends a round (ids outside the vocabulary
    # are refused, an empty list is not).
    config.overlay(json.dumps({"model": {"eos_token_id": [], "decoder": {"session_options": {
        "intra_op_num_threads": 1, "inter_op_num_threads": 1}}}}))
    return og.Model(config)


def decode(model, prompt: list[int], num_tokens: int) -> tuple[float, list[int]]:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    # min_length as well: with the overlay's empty EOS list alone it still ends at an EOS/pad id (0 with our
    # tokenizers) when a trained model picks it, and a round of fewer tokens would read as a faster one
    params.set_search_options(do_sample=False, max_length=len(prompt) + num_tokens,
                              min_length=len(prompt) + num_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)  # the prefill
    generator.generate_next_token()  # picks the first token from the prefill's logits
    tokens = [int(generator.get_next_tokens()[0])]
    start = time.process_time()
    while len(tokens) < num_tokens and not generator.is_done():
        generator.generate_next_token()  # one decode step on the previous token, then the argmax
        tokens.append(int(generator.get_next_tokens()[0]))
    return time.process_time() - start, tokens


def main() -> int:
    if len(sys.argv) != 2:
        print(json.dumps({"error": "usage: ort_genai_cpu_worker.py MODEL_DIR"}), flush=True)
        return 2
    import onnxruntime_genai as og

    model = load(sys.argv[1])
    decode(model, [5, 6, 7, 8], 4)  # warm-up: allocations, first-run kernels
    print(json.dumps({"ready": True, "onnxruntime_genai": og.__version__}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        cpu_s, tokens = decode(model, req["prompt"], int(req["tokens"]))
        print(json.dumps({"cpu_s": cpu_s, "tokens": tokens}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
