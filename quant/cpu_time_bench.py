"""Decode speed of a checkpoint and its quantized children in our engine, measured in CPU time.

Wall-clock tokens/s on a shared machine measures the neighbours as much as the code. The CPU time a
single-threaded process spends is close to what it would take alone, so here every engine runs with
torch.set_num_threads(1) and each decode is timed with time.process_time. All models are loaded in one
process and measured in interleaved rounds (A B C, A B C, ...), so slow drift of the machine (caches,
frequency) hits each the same; the median round per model is reported, and each speed as a ratio to the first
(the fp32 parent). The greedy tokens of every round are kept so a broken kernel shows as a changed output.

    python -m quant.cpu_time_bench runs/base/final runs/base/quant/gptq-4-128 runs/base/quant/int8 --tokens 64

`--ort-genai DIR ...` adds onnxruntime-genai exports (its model builder, e.g. `-p int4`: MatMulNBits) to the same
rounds. onnxruntime-genai lives in the peers' environment, so each export runs in its own worker process
(quant/ort_genai_cpu_worker.py under --peers-python) with intra/inter-op threads 1, which times its decode steps
with its own process CPU time and answers one round per request, interleaved with ours.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from lifecycle.errors import ConfigError

WORKER = Path(__file__).with_name("ort_genai_cpu_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[1]


def _engine(path: str):
    from serve.engine.llm_engine import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(model=path, device="cpu", dtype="float32", enable_prefix_caching=False,
                                  kv_cache_memory_bytes=256 << 20))


def decode_cpu_time(engine, prompt: list[int], num_tokens: int, request_id: str) -> tuple[float, list[int]]:
    """CPU seconds of this process between the first and the last of `num_tokens` greedy tokens (decode only:
    the prefill step that produces the first token is not counted), and the tokens."""
    from serve.types import SamplingParams

    engine.add_request(request_id, prompt, SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True))
    tokens: list[int] = []
    start = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += [t for c in out.outputs for t in c.token_ids]
        if start is None and tokens:
            start = time.process_time()
    assert start is not None
    return time.process_time() - start, tokens


class _Timed:
    """A quantized linear that adds the CPU time of each one-row call (a decode step) to `spent[kind]`."""

    def __init__(self, inner, kind: str, spent: dict[str, float]):
        self.inner, self.kind, self.spent = inner, kind, spent

    def __call__(self, *args, **kwargs):
        if args[0].shape[0] != 1:  # prefill rows: not decode
            return self.inner(*args, **kwargs)
        t0 = time.process_time()
        out = self.inner(*args, **kwargs)
        self.spent[self.kind] += time.process_time() - t0
        return out

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def profile_linears(engine, prompt: list[int], num_tokens: int) -> dict[str, float] | None:
    """CPU ms per decode token spent in each kind of quantized linear (qkv, o, gate_up, down, lm_head) and in
    everything else (attention, norms, RoPE, sampling, the engine's Python), from one extra greedy decode with a
    timer around every quantized linear. None for a model without quantized linears (the fp32 one-call path)."""
    import torch

    model = engine.runner.model
    kinds = [k for k in ("qkv", "o", "gate_up", "down") if not isinstance(getattr(model.layers[0], k), torch.Tensor)]
    head = not isinstance(model.lm_head, torch.Tensor)
    if not kinds and not head:
        return None
    spent = dict.fromkeys(kinds + (["lm_head"] if head else []), 0.0)
    # The one-call forward runs the quantized projections inside C, out of the timers' reach: the profile takes
    # the per-op path (the same kernels, a Python call each), so "rest" includes that path's call overhead.
    one_call = (model._layer_ptrs, model._proj_descs)
    if model._proj_descs is not None:
        model._layer_ptrs = model._proj_descs = None
    originals = [(layer, k, getattr(layer, k)) for layer in model.layers for k in kinds]
    for layer, k, inner in originals:
        object.__setattr__(layer, k, _Timed(inner, k, spent))
    if head:
        model.lm_head = _Timed(model.lm_head, "lm_head", spent)
    try:
        decode_cpu_time(engine, prompt, 2, "profile-warmup")
        for k in spent:
            spent[k] = 0.0
        total, _ = decode_cpu_time(engine, prompt, num_tokens, "profile")
    finally:
        for layer, k, inner in originals:
            object.__setattr__(layer, k, inner)
        if head:
            model.lm_head = model.lm_head.inner
        model._layer_ptrs, model._proj_descs = one_call
    steps = num_tokens - 1  # one-row calls per linear: the prefill gives the first token, each later one a step
    out = {k: 1e3 * v / steps for k, v in spent.items()}
    out["rest"] = 1e3 * total / steps - sum(out.values())
    out["all"] = 1e3 * total / steps
    return out


class OrtGenaiWorker:
    """One onnxruntime-genai export, decoding in a peers'-python subprocess that reports its own CPU time."""

    def __init__(self, model_dir: str, python: str):
        if not (Path(model_dir) / "genai_config.json").is_file():
            raise ConfigError(f"--ort-genai {model_dir}: not an onnxruntime-genai export (no genai_config.json)")
        if not Path(python).is_file():
            raise ConfigError(f"--peers-python {python}: not found (make peers builds .venv-peers)")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env |= {"OMP_NUM_THREADS": "1"}
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([python, str(WORKER), model_dir], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True, env=env)
        self.model_dir = model_dir
        self.info = self._reply()

    def _reply(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self._stderr.seek(0)
            tail = "\n".join(self._stderr.read().strip().splitlines()[-8:])
            raise RuntimeError(f"onnxruntime-genai worker for {self.model_dir} exited ({self.proc.returncode}):\n{tail}")
        return json.loads(line)

    def decode(self, prompt: list[int], num_tokens: int) -> tuple[float, list[int]]:
        self.proc.stdin.write(json.dumps({"prompt": prompt, "tokens": num_tokens}) + "\n")
        self.proc.stdin.flush()
        reply = self._reply()
        return reply["cpu_s"], reply["tokens"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self._stderr.close()


def bench(paths: list[str], *, prompt: list[int], num_tokens: int, rounds: int, threads: int = 1,
          ort_genai: list[str] = (), peers_python: str | None = None, profile: bool = False) -> dict[str, Any]:
    import torch

    if num_tokens < 2 or rounds < 1:
        raise ConfigError("--tokens must be >= 2 and --rounds >= 1")
    torch.set_num_threads(threads)
    engines = {p: _engine(p) for p in paths}
    for p, eng in engines.items():  # warm-up: kernel builds, allocator, first-call paths
        decode_cpu_time(eng, prompt, 4, "warmup")
    workers: dict[str, OrtGenaiWorker] = {}
    try:
        for d in ort_genai:
            workers[f"ort-genai:{d}"] = OrtGenaiWorker(d, peers_python or str(REPO_ROOT / ".venv-peers/bin/python"))
        runs = {p: (lambda r, e=eng: decode_cpu_time(e, prompt, num_tokens, f"r{r}")) for p, eng in engines.items()}
        runs |= {k: (lambda r, w=w: w.decode(prompt, num_tokens)) for k, w in workers.items()}
        times: dict[str, list[float]] = {k: [] for k in runs}
        outputs: dict[str, list[list[int]]] = {k: [] for k in runs}
        for r in range(rounds):  # interleaved: every model once per round
            for k, fn in runs.items():
                seconds, tokens = fn(r)
                if len(tokens) != num_tokens:  # the rate is (num_tokens - 1) / seconds: a short round would lie
                    raise RuntimeError(f"{k}: decoded {len(tokens)} of {num_tokens} tokens in round {r}")
                times[k].append(seconds)
                outputs[k].append(tokens)
    finally:
        for w in workers.values():
            w.close()
    paths_all = list(runs)
    first = paths[0]
    base_tps = (num_tokens - 1) / statistics.median(times[first])
    rows = []
    for p in paths_all:
        med = statistics.median(times[p])
        tps = (num_tokens - 1) / med
        path = (engines[p].runner.model.kernel_path if p in engines else
                f"onnxruntime-genai {workers[p].info.get('onnxruntime_genai')} (1 intra-op thread, own process)")
        rows.append({"model": p, "engine_path": path,
                     "cpu_s_per_token": med / (num_tokens - 1), "tokens_per_cpu_s": tps,
                     "vs_first": tps / base_tps, "rounds_cpu_s": times[p],
                     "same_tokens_every_round": all(o == outputs[p][0] for o in outputs[p]),
                     "tokens_equal_first_model": outputs[p][0] == outputs[first][0]})
    if profile:  # after the timed rounds, so the timers' own cost is not in them
        for row in rows:
            if row["model"] in engines:
                row["profile_cpu_ms_per_token"] = profile_linears(engines[row["model"]], prompt, num_tokens)
    return {"threads": threads, "num_tokens": num_tokens, "rounds": rounds, "prompt_len": len(prompt), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m quant.cpu_time_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="checkpoints; the first is the reference (the fp32 parent)")
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens decoded per round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per model (the median is reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time ~ time alone)")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (fixed ids, the same for all)")
    ap.add_argument("--ort-genai", nargs="+", default=[], metavar="DIR",
                    help="onnxruntime-genai exports to time in the same rounds (e.g. the model builder's -p int4 "
                         "output for the first checkpoint)")
    ap.add_argument("--peers-python", default=str(REPO_ROOT / ".venv-peers" / "bin" / "python"),
                    help="python with onnxruntime-genai (for --ort-genai)")
    ap.add_argument("--profile", action="store_true",
                    help="then one more decode per quantized model with a timer around each quantized linear: CPU ms "
                         "per token in qkv, o, gate_up, down, lm_head and the rest")
    ap.add_argument("--output", default=None, help="also write the result as JSON here")
    args = ap.parse_args(argv)
    for m in args.models:
        if not (Path(m) / "config.json").is_file():
            raise SystemExit(f"error: {m}: not a checkpoint directory (no config.json)")
    prompt = [(7 * i + 3) % 200 + 10 for i in range(args.prompt_len)]
    try:
        result = bench(args.models, prompt=prompt, num_tokens=args.tokens, rounds=args.rounds, threads=args.threads,
                       ort_genai=args.ort_genai, peers_python=args.peers_python, profile=args.profile)
    except (ConfigError, RuntimeError) as err:
        raise SystemExit(f"error: {err}") from None
    for row in result["rows"]:
        print(f"{row['tokens_per_cpu_s']:8.2f} tok/CPU-s  {row['vs_first']:.2f}x  "
              f"tokens==first: {row['tokens_equal_first_model']}  {row['model']}\n          {row['engine_path']}")
        if row.get("profile_cpu_ms_per_token"):
            print("          CPU ms/token: " + ", ".join(f"{k} {v:.2f}" for k, v in row["profile_cpu_ms_per_token"].items()))
    if args.output:
        from quant.report import atomic_write

        atomic_write(Path(args.output), json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
