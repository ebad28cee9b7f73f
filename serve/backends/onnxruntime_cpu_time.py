"""Single-stream decode of the native engine's low-bit path next to onnxruntime's, in CPU time, one thread each.

Wall-clock tokens/s on a shared machine measures the neighbours as much as the code. Here every engine decodes on
one thread (torch.set_num_threads(1); onnxruntime sessions with intra_op_num_threads=1) and each decode is timed
with time.process_time (quant/cpu_time_bench.py's `decode_cpu_time`: the CPU seconds between the first and the
last greedy token, so the prefill is not counted). All engines live in one process and run in interleaved rounds
(A B C, A B C, ...), so slow drift of the machine hits each the same; the median round is reported, with each
engine's speed as a ratio to the first one's. The same quantized child and ONNX exports as `lmforge bench engine
--backend native-int4,onnxruntime-int4` are used (made once, cached under $LMFORGE_HOME/bench/).

    python -m serve.backends.onnxruntime_cpu_time --engines native-int4,onnxruntime-int4,native --tokens 64 --rounds 7

Engines: native (fp32), native-int4, native-int8 (serve/backends/native_quant_bench.py), onnxruntime (fp32),
onnxruntime-int4 (serve/backends/onnxruntime_bench.py). Default model: the bench's random-init `small` preset.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from lifecycle.errors import ConfigError

ENGINES = ("native", "native-int4", "native-int8", "onnxruntime", "onnxruntime-int4")


def open_engine(name: str, model_path: Path, cache_dir: Path) -> tuple[Any, str]:
    """(engine with add_request / step, what it runs) for `name`, single-threaded."""
    from serve.backends import native_quant_bench, onnxruntime_bench

    if name.startswith("native"):
        from serve.engine.llm_engine import EngineConfig, LLMEngine

        path = model_path if name == "native" else native_quant_bench.quantize_for_bench(
            model_path, cache_dir, native_quant_bench.BACKENDS[name])
        engine = LLMEngine(EngineConfig(model=str(path), device="cpu", dtype="float32", enable_prefix_caching=False,
                                        kv_cache_memory_bytes=256 << 20))
        return engine, f"{path}: {engine.runner.model.kernel_path}"
    from serve.backends.onnxruntime_engine import OrtEngine

    quantize, runner = onnxruntime_bench.BACKENDS[name]
    export = onnxruntime_bench.export_for_bench(model_path, cache_dir, quantize)
    return OrtEngine(export, max_num_seqs=1, runner=runner, num_threads=1), f"{export}: onnxruntime {runner} runner"


def bench(names: list[str], model_path: Path, cache_dir: Path, *, prompt: list[int], num_tokens: int,
          rounds: int) -> dict[str, Any]:
    import torch

    from quant.cpu_time_bench import decode_cpu_time

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engines = {n: open_engine(n, model_path, cache_dir) for n in names}
        for name, (engine, _) in engines.items():  # warm-up: kernel builds, allocator, first-call paths
            decode_cpu_time(engine, prompt, 4, f"warmup-{name}")
        times: dict[str, list[float]] = {n: [] for n in names}
        outputs: dict[str, list[list[int]]] = {n: [] for n in names}
        for r in range(rounds):
            for name, (engine, _) in engines.items():
                seconds, tokens = decode_cpu_time(engine, prompt, num_tokens, f"r{r}")
                times[name].append(seconds)
                outputs[name].append(tokens)
    finally:
        torch.set_num_threads(previous)
    first = names[0]
    reference = "native" if "native" in names else first  # whose tokens the others' are compared with
    base = (num_tokens - 1) / statistics.median(times[first])
    rows = []
    for name in names:
        tps = (num_tokens - 1) / statistics.median(times[name])
        rows.append({"engine": name, "runs": engines[name][1], "cpu_ms_per_token": 1e3 / tps, "tokens_per_cpu_s": tps,
                     "vs_first": tps / base, "rounds_cpu_s": times[name],
                     "same_tokens_every_round": all(o == outputs[name][0] for o in outputs[name]),
                     "tokens_equal_reference": outputs[name][0] == outputs[reference][0]})
    return {"model": str(model_path), "threads": 1, "tokens_reference": reference, "num_tokens": num_tokens, "rounds": rounds,
            "prompt_len": len(prompt), "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    first, reference = result["rows"][0]["engine"], result["tokens_reference"]
    lines = [f"| engine | CPU ms / token | tokens / CPU-s | vs {first} | same greedy tokens as {reference} |",
             "|---|---:|---:|---:|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['engine']} | {row['cpu_ms_per_token']:.2f} | {row['tokens_per_cpu_s']:.1f} | "
                     f"{row['vs_first']:.2f}x | {row['tokens_equal_reference']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from lifecycle.demo import DEFAULT_CACHE

    ap = argparse.ArgumentParser(prog="python -m serve.backends.onnxruntime_cpu_time",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the bench's random-init `small` preset)")
    ap.add_argument("--engines", default="native-int4,onnxruntime-int4,native",
                    help=f"comma separated, the first is the reference: {', '.join(ENGINES)}")
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens decoded per round")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds per engine (the median is reported)")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (fixed ids, the same for all)")
    ap.add_argument("--output", default=None, help="also write the result as JSON here")
    args = ap.parse_args(argv)
    names = list(dict.fromkeys(n.strip() for n in args.engines.split(",") if n.strip()))
    unknown = sorted(set(names) - set(ENGINES))
    if unknown or not names:
        raise ConfigError(f"--engines: unknown {unknown}; choose from {', '.join(ENGINES)}")
    if args.tokens < 2 or args.rounds < 1 or args.prompt_len < 1:
        raise ConfigError("--tokens must be >= 2, --rounds and --prompt-len >= 1")
    cache_dir = Path(DEFAULT_CACHE)
    if args.model:
        model_path = Path(args.model)
    else:
        from serve.bench_engine import default_model

        model_path = default_model(cache_dir)
    prompt = [(7 * i + 3) % 200 + 10 for i in range(args.prompt_len)]
    result = bench(names, model_path, cache_dir, prompt=prompt, num_tokens=args.tokens, rounds=args.rounds)
    print(markdown(result))
    for row in result["rows"]:
        print(f"{row['engine']}: {row['runs']}")
    if args.output:
        from lifecycle.data.manifest import atomic_write_text

        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.output), json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
