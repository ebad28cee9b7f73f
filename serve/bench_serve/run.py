"""`bench_serve()`: per backend, each level of N clients through gRPC and then, back to back, in-process."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from serve.bench_serve.config import BenchServeConfig
from serve.bench_serve.load import run_level, summarize_level
from serve.bench_serve.targets import GrpcStreams, InProcessBackend, InProcessEngine, ServerProcess, warm_up_prompts

CLIENT_PLACEMENT = ("clients: this process, grpc.aio, one channel per client; server: its own process "
                    "(`python -m serve serve`)")


def serve_config_for(cfg: BenchServeConfig, model: Path, backend: str = "native") -> Any:
    """The server's (and the in-process engine's) configuration: limits that admit every client at once."""
    from serve.launch import ServeConfig

    return ServeConfig(model=str(model), backend=backend, host="127.0.0.1", port=0, grace_s=10.0,
                       max_concurrent_requests=cfg.max_concurrency, max_queue_length=cfg.max_concurrency,
                       max_num_seqs=max(256, cfg.max_concurrency), max_num_batched_tokens=cfg.max_num_batched_tokens,
                       kv_cache_memory_bytes=cfg.kv_cache_memory_bytes)


def level_prompts(cfg: BenchServeConfig, vocab_size: int) -> dict[int, list[list[int]]]:
    """Random token-id prompts per level (distinct across levels: no prefix-cache hits), the same for every side."""
    rng = random.Random(cfg.seed)
    return {n: [[rng.randrange(16, vocab_size) for _ in range(cfg.prompt_len)] for _ in range(cfg.num_requests(n))]
            for n in cfg.concurrency}


async def measure_levels(cfg: BenchServeConfig, prompts: dict[int, list[list[int]]], streams: GrpcStreams,
                         server: ServerProcess | None, engine: InProcessEngine | InProcessBackend | None,
                         bar: Any) -> list[dict[str, Any]]:
    """Level by level, gRPC then in-process back to back: on a shared machine, load that comes and goes
    then weighs on both sides of each ratio alike (running all gRPC levels first would not)."""
    warm_up = warm_up_prompts(next(iter(prompts.values())))
    await streams.open(1)
    await run_level(streams.stream, warm_up, 1)
    await streams.close()
    if engine is not None:
        await run_level(engine.stream, warm_up, 1)
    levels = []
    for n, level in prompts.items():
        await streams.open(n)  # connections are up before the clock starts
        client_cpu, server_cpu = time.process_time(), server.cpu_s() if server else None
        records, elapsed = await run_level(streams.stream, level, n, on_done=lambda: bar.update(1))
        client_cpu = time.process_time() - client_cpu
        server_after = server.cpu_s() if server else None
        await streams.close()
        if server is not None:
            server.check_alive()
        grpc = summarize_level(n, records, elapsed, cfg.output_len) | {
            "client_cpu_s": client_cpu,
            "server_cpu_s": server_after - server_cpu if server_cpu is not None and server_after is not None else None}
        in_process = None
        if engine is not None:
            cpu, preemptions = time.process_time(), engine.num_preemptions()
            records, elapsed = await run_level(engine.stream, level, n, on_done=lambda: bar.update(1))
            # Preempted sequences are recomputed: a KV cache too small for N clients shows here (the server's
            # engine has the same config and prompts, so the same happens there).
            in_process = summarize_level(n, records, elapsed, cfg.output_len) | {
                "cpu_s": time.process_time() - cpu, "num_preemptions": engine.num_preemptions() - preemptions}
        ratio = (grpc["output_tokens_per_s"] / in_process["output_tokens_per_s"]
                 if in_process and grpc["output_tokens_per_s"] and in_process["output_tokens_per_s"] else None)
        levels.append({"concurrency": n, "grpc": grpc, "in_process": in_process, "grpc_over_in_process": ratio})
    return levels


def bench_serve(cfg: BenchServeConfig, cache_dir: Path | None = None) -> dict[str, Any]:
    from tqdm import tqdm

    from lifecycle.bench import machine_info
    from lifecycle.data.manifest import atomic_write_text
    from lifecycle.demo import DEFAULT_CACHE
    from serve.api.auth import read_bearer_token
    from serve.bench_engine import default_model
    from serve.bench_serve.report import goals_text, plot_serve, serve_markdown

    cache_dir = Path(cache_dir or DEFAULT_CACHE)
    token = read_bearer_token(cfg.auth_token_file, cfg.auth_token_env)
    model = Path(cfg.model).expanduser().resolve() if cfg.model else (None if cfg.target else default_model(cache_dir))
    vocab_size, target_info = _vocab_size(cfg, model, token)
    prompts = level_prompts(cfg, vocab_size)
    serve_cfg = serve_config_for(cfg, model) if model is not None else None
    out = Path(cfg.output)
    report: dict[str, Any] = {
        "benchmark": "serve", "model": str(model) if model else None, "config": asdict(cfg),
        "machine": machine_info(), "client_placement": CLIENT_PLACEMENT, "target": target_info,
        "workload": {"prompt_len": cfg.prompt_len, "output_len": cfg.output_len, "greedy": True, "ignore_eos": True,
                     "requests_per_level": {str(n): len(p) for n, p in prompts.items()}},
        "server_config": asdict(serve_cfg) if serve_cfg is not None else None, "results": {}, "goals": {}}
    sides = 1 + int(cfg.in_process and model is not None)
    bar = tqdm(total=len(cfg.backend) * sides * sum(map(len, prompts.values())), desc="bench serve", unit="req",
               disable=not cfg.progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for backend in cfg.backend:
            report["results"][backend] = _one_backend(cfg, backend, serve_cfg, prompts, token, out, bar)
            report["goals"][backend] = _goals(report["results"][backend]["levels"])
    finally:
        bar.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), serve_markdown(report) + "\n" + goals_text(report) + "\n")
    if cfg.plot:
        plot_serve(report, out.with_suffix(".png"))
    print(serve_markdown(report))
    print(goals_text(report))
    return report


def _one_backend(cfg: BenchServeConfig, backend: str, serve_cfg: Any, prompts: dict[int, list[list[int]]],
                 token: str | None, out: Path, bar: Any) -> dict[str, Any]:
    result: dict[str, Any] = {}
    server = engine = None
    if serve_cfg is not None and backend != serve_cfg.backend:
        serve_cfg = dataclasses.replace(serve_cfg, backend=backend)
    try:
        if cfg.target is None:
            log_path = out.with_name(f"{out.stem}.{backend}.server.log")
            server = ServerProcess(serve_cfg, log_path)
            print(f"[bench] {backend}: starting {' '.join(server.argv[2:])} (log: {log_path})", flush=True)
            address = server.start(cfg.server_start_timeout_s)
            result["server"] = {"argv": server.argv[1:], "address": address, "log": str(log_path)}
        else:
            address = cfg.target_address()
            result["server"] = {"address": address, "external": True}
        if cfg.in_process and serve_cfg is not None:
            print(f"[bench] {backend}: loading the in-process engine (the server's engine config)", flush=True)
            # native: its engine behind AsyncEngine, as always; others: the server's own Backend class, in this
            # process (vLLM's engine binds to the event loop that streams, so it starts inside it).
            engine = (InProcessEngine(serve_cfg.engine_config(), cfg.output_len) if backend == "native"
                      else InProcessBackend(serve_cfg.make_backend(), cfg.output_len))
        print(f"[bench] {backend} at {address}: clients {cfg.concurrency}, gRPC"
              + (" then in-process at each" if engine else ""), flush=True)
        streams = GrpcStreams(address, cfg.output_len, token=token, timeout_s=cfg.timeout_s)
        result["levels"] = asyncio.run(_measure(cfg, prompts, streams, server, engine, bar))
    finally:
        if isinstance(engine, InProcessEngine):
            engine.shutdown()
        if server is not None:
            result["server"]["exit_code"] = server.stop()
    return result


async def _measure(cfg: BenchServeConfig, prompts: dict[int, list[list[int]]], streams: GrpcStreams,
                   server: ServerProcess | None, engine: InProcessEngine | InProcessBackend | None,
                   bar: Any) -> list[dict[str, Any]]:
    if not isinstance(engine, InProcessBackend):
        return await measure_levels(cfg, prompts, streams, server, engine, bar)
    await engine.start()
    try:
        return await measure_levels(cfg, prompts, streams, server, engine, bar)
    finally:
        await engine.shutdown()


def _goals(levels: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 4's goals: gRPC >= 90% of in-process at 64 clients; 256 clients with no failed or short request."""
    by_n = {lv["concurrency"]: lv for lv in levels}
    goals: dict[str, Any] = {}
    if 64 in by_n:
        goals["grpc_over_in_process_at_64"] = by_n[64]["grpc_over_in_process"]
    if 256 in by_n:
        g = by_n[256]["grpc"]
        goals["failed_at_256"] = g["num_requests"] - g["num_ok"] + g["num_wrong_length"]
    return goals


def _vocab_size(cfg: BenchServeConfig, model: Path | None, token: str | None) -> tuple[int, dict[str, Any] | None]:
    """The vocabulary the random prompts are drawn from: the checkpoint's, or what --target reports."""
    if model is not None and cfg.target is None:
        from lifecycle.checkpoint import load_checkpoint

        return int(load_checkpoint(model).config["vocab_size"]), None
    from lifecycle.errors import LmforgeError
    from serve.client import Client

    with Client(cfg.target_address(), token=token) as client:
        try:
            info = client.model_info(timeout_s=30)
        except Exception as err:  # noqa: BLE001 - grpc.RpcError: say where we tried
            raise LmforgeError(f"--target {cfg.target}: cannot reach the server: "
                               f"{getattr(err, 'details', lambda: err)()}") from None
    return info.vocab_size, {"name": info.name, "backend": info.backend, "max_model_len": info.max_model_len}


# ------------------------------------------------------------------------------------------- CLI


def add_action(actions: Any) -> None:
    """`lmforge bench serve` (registered under the `bench` group of lifecycle/bench.py)."""
    from lifecycle.cli import add_subcommand
    from lifecycle.config import add_config_arguments
    from serve import bench_serve as package

    parser = add_subcommand(
        actions, "serve", help="N concurrent streaming gRPC clients vs the in-process engine (throughput, TTFT, ITL)",
        description=package.__doc__,
        example="lmforge bench serve --concurrency 1 8 64 256 --prompt-len 128 --output-len 128")
    add_config_arguments(parser, BenchServeConfig)
    parser.set_defaults(func=_run)


def _run(args: Any) -> int:
    from lifecycle.config import config_from_args

    bench_serve(config_from_args(BenchServeConfig, args))
    return 0


