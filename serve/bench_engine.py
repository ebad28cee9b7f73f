"""`lmforge bench engine`: the native engine's workloads next to peers, in one run.

Workloads (issue 3):
  W1 throughput  64 requests x (prompt 128, output 128, ignore EOS), all at once: output tokens/s.
  W2 latency     1 request, prompt 128, 256 output tokens: time to first token, median inter-token latency.
  W3 speculative the demo's trained target + draft, greedy, 256 output tokens on held-out prompts, one stream:
                 speedup over the same engine without speculation, tokens per target step, identical outputs.
  W4 prefix      a 1,024-token shared prefix + different 32-token questions: TTFT cold vs warm.
Peers in the same invocation: transformers `generate` (W1 as one padded static batch, W2 single stream).
The machine's fp32 matmul rate is measured first, and every throughput is also given as a fraction of the
roofline (FLOPs per token x tokens/s / matmul rate). Runs are sequential: on 2 cores, two at once distort both.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lifecycle.errors import ConfigError

WORKLOADS = ("w1", "w2", "w3", "w4")
PEERS = ("native", "transformers")


@dataclass
class BenchEngineConfig:
    model: str | None = field(default=None, metadata={"help": "checkpoint to serve (default: a random-init `small` preset with the demo tokenizer)"})
    workloads: list[str] = field(default_factory=lambda: list(WORKLOADS), metadata={"help": "subset of w1 w2 w4"})
    backends: list[str] = field(default_factory=lambda: list(PEERS), metadata={"help": "native and/or transformers"})
    num_requests: int = field(default=64, metadata={"help": "W1 concurrent requests"})
    prompt_len: int = field(default=128, metadata={"help": "W1/W2 prompt tokens"})
    output_len: int = field(default=128, metadata={"help": "W1 output tokens per request"})
    latency_output_len: int = field(default=256, metadata={"help": "W2 output tokens"})
    prefix_len: int = field(default=1024, metadata={"help": "W4 shared prefix tokens"})
    target: str | None = field(default=None, metadata={"help": "W3 target checkpoint (default: the demo's, if built)"})
    draft: str | None = field(default=None, metadata={"help": "W3 draft checkpoint (default: the demo's, if built)"})
    num_speculative_tokens: int = field(default=4, metadata={"help": "W3 drafts per step (k)"})
    spec_prompts: int = field(default=4, metadata={"help": "W3 held-out prompts, run one at a time"})
    output: str = field(default="runs/bench/engine.json", metadata={"help": "JSON report"})
    plot: bool = field(default=True, metadata={"help": "write a PNG next to the JSON"})
    seed: int = field(default=0, metadata={"help": "seed for the random prompts"})

    def __post_init__(self) -> None:
        unknown = set(self.workloads) - set(WORKLOADS)
        if unknown:
            raise ConfigError(f"--workloads: unknown {sorted(unknown)}; choose from {', '.join(WORKLOADS)}")
        unknown = set(self.backends) - set(PEERS)
        if unknown:
            raise ConfigError(f"--backends: unknown {sorted(unknown)}; available here: {', '.join(PEERS)}")
        for name in ("num_requests", "prompt_len", "output_len", "latency_output_len", "prefix_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")


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
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"output_tokens_per_s": num_out / elapsed, "elapsed_s": elapsed, "output_tokens": num_out}


def native_stream(engine, prompt: list[int], output_len: int, request_id: str) -> dict[str, Any]:
    """One request alone: TTFT and the gaps between tokens as the step loop delivers them."""
    from serve.types import SamplingParams

    start = time.perf_counter()
    engine.add_request(request_id, prompt, SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True))
    stamps = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            stamps.extend([time.perf_counter()] * sum(len(c.token_ids) for c in out.outputs))
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft_ms": (stamps[0] - start) * 1e3, "itl_median_ms": statistics.median(gaps) * 1e3 if gaps else None,
            "decode_tokens_per_s": 1.0 / statistics.median(gaps) if gaps else None, "output_tokens": len(stamps)}


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
    heldout = demo / "corpus" / "heldout.jsonl"
    plain = LLMEngine(EngineConfig(model=str(target)))
    tok = plain.tokenizer
    texts = [json.loads(line)["text"] for line in heldout.read_text().splitlines()[:cfg.spec_prompts]] \
        if heldout.is_file() else ["os.path.join(a, *p)"] * cfg.spec_prompts
    prompts = [tok.encode(t, add_special_tokens=False)[:48] for t in texts]
    spec = LLMEngine(EngineConfig(model=str(target), speculative_method="draft", draft_model=str(draft),
                                  num_speculative_tokens=cfg.num_speculative_tokens))
    runs = {}
    for name, engine in (("plain", plain), ("speculative", spec)):
        print(f"[bench] native W3 {name}: {len(prompts)} prompts x {cfg.latency_output_len} tokens", flush=True)
        engine.generate([prompts[0][:8]], None)  # warm-up
        outputs, steps, start = [], 0, time.perf_counter()
        from serve.types import SamplingParams

        params = SamplingParams(max_tokens=cfg.latency_output_len, temperature=0.0, ignore_eos=True)
        for i, prompt in enumerate(prompts):
            engine.add_request(f"w3-{name}-{i}", prompt, params)
            tokens: list[int] = []
            while engine.has_unfinished_requests():
                steps += 1
                for out in engine.step():
                    tokens.extend(t for c in out.outputs for t in c.token_ids)
            outputs.append(tokens)
        elapsed = time.perf_counter() - start
        stats = engine.stats()
        runs[name] = {"elapsed_s": elapsed, "tokens_per_s": sum(map(len, outputs)) / elapsed,
                      "tokens_per_step": sum(map(len, outputs)) / steps, "outputs": outputs,
                      "draft_tokens": stats.spec_draft_tokens_total, "accepted_tokens": stats.spec_accepted_tokens_total}
    identical = runs["plain"]["outputs"] == runs["speculative"]["outputs"]
    for run in runs.values():
        del run["outputs"]
    return {"target": str(target), "draft": str(draft), "k": cfg.num_speculative_tokens, **runs,
            "speedup": runs["speculative"]["tokens_per_s"] / runs["plain"]["tokens_per_s"],
            "outputs_identical": identical,
            "acceptance_rate": (runs["speculative"]["accepted_tokens"] / runs["speculative"]["draft_tokens"]
                                if runs["speculative"]["draft_tokens"] else None)}


# ------------------------------------------------------------------------------------ transformers


def hf_w1(model, prompts: list[list[int]], output_len: int, pad_id: int) -> dict[str, Any]:
    """A padded static batch through `generate` (all prompts are the same length here: no waste)."""
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                             min_new_tokens=output_len, do_sample=False, pad_token_id=pad_id)
    elapsed = time.perf_counter() - start
    num_out = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"output_tokens_per_s": num_out / elapsed, "elapsed_s": elapsed, "output_tokens": num_out}


def hf_stream(model, prompt: list[int], output_len: int, pad_id: int) -> dict[str, Any]:
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    ids = torch.tensor([prompt])
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                       min_new_tokens=output_len, do_sample=False, pad_token_id=pad_id,
                       logits_processor=LogitsProcessorList([Stamp()]))
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft_ms": (stamps[0] - start) * 1e3, "itl_median_ms": statistics.median(gaps) * 1e3,
            "decode_tokens_per_s": 1.0 / statistics.median(gaps), "output_tokens": len(stamps)}


# ------------------------------------------------------------------------------------------- main


def bench_engine(cfg: BenchEngineConfig, cache_dir: Path | None = None) -> dict[str, Any]:
    from lifecycle.bench import machine_info
    from lifecycle.checkpoint import load_checkpoint
    from lifecycle.demo import DEFAULT_CACHE
    from serve.engine.llm_engine import EngineConfig, LLMEngine

    model_path = Path(cfg.model) if cfg.model else default_model(Path(cache_dir or DEFAULT_CACHE))
    ckpt = load_checkpoint(model_path)
    rate = matmul_gflops()
    fpt = flops_per_token(ckpt.config)
    vocab = ckpt.config["vocab_size"]
    rng = random.Random(cfg.seed)
    report: dict[str, Any] = {"benchmark": "engine", "model": str(model_path), "config": asdict(cfg),
                              "machine": machine_info() | {"fp32_matmul_gflops": rate},
                              "flops_per_token": fpt, "results": {}}
    res = report["results"]

    def roofline(tokens_per_s: float | None) -> float | None:
        return None if not tokens_per_s else tokens_per_s * fpt / (rate * 1e9)

    w1_prompts = _prompts(rng, cfg.num_requests, cfg.prompt_len, vocab)
    w2_prompt = _prompts(rng, 1, cfg.prompt_len, vocab)[0]
    if "native" in cfg.backends:
        engine = LLMEngine(EngineConfig(model=str(model_path)))
        engine.generate([w2_prompt[:8]], None)  # warm-up: allocator, thread pool
        if "w1" in cfg.workloads:
            print(f"[bench] native W1: {cfg.num_requests} x ({cfg.prompt_len} in, {cfg.output_len} out)", flush=True)
            r = native_w1(engine, w1_prompts, cfg.output_len)
            res.setdefault("w1", {})["native"] = r | {"roofline_fraction": roofline(r["output_tokens_per_s"])}
        if "w2" in cfg.workloads:
            print("[bench] native W2: one stream", flush=True)
            r = native_stream(engine, w2_prompt, cfg.latency_output_len, "w2")
            res.setdefault("w2", {})["native"] = r | {"roofline_fraction": roofline(r["decode_tokens_per_s"])}
        if "w3" in cfg.workloads:
            res["w3"] = {"native": native_w3(cfg, Path(cache_dir or DEFAULT_CACHE))}
        if "w4" in cfg.workloads:
            print(f"[bench] native W4: {cfg.prefix_len}-token shared prefix", flush=True)
            prefix = _prompts(rng, 1, cfg.prefix_len, vocab)[0]
            questions = _prompts(rng, 2, 32, vocab)
            cold = native_stream(engine, prefix + questions[0], 1, "w4-cold")
            warm = native_stream(engine, prefix + questions[1], 1, "w4-warm")
            res["w4"] = {"native": {"ttft_cold_ms": cold["ttft_ms"], "ttft_warm_ms": warm["ttft_ms"],
                                    "warm_over_cold": warm["ttft_ms"] / cold["ttft_ms"]}}
        del engine
    if "transformers" in cfg.backends:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_path).eval()
        pad = ckpt.config.get("pad_token_id") or 0
        if "w1" in cfg.workloads:
            print("[bench] transformers W1: padded static batch", flush=True)
            r = hf_w1(model, w1_prompts, cfg.output_len, pad)
            res.setdefault("w1", {})["transformers"] = r | {"roofline_fraction": roofline(r["output_tokens_per_s"])}
        if "w2" in cfg.workloads:
            print("[bench] transformers W2: one stream", flush=True)
            r = hf_stream(model, w2_prompt, cfg.latency_output_len, pad)
            res.setdefault("w2", {})["transformers"] = r | {"roofline_fraction": roofline(r["decode_tokens_per_s"])}
    for name, key in (("w1", "output_tokens_per_s"), ("w2", "decode_tokens_per_s")):
        if name in res and {"native", "transformers"} <= set(res[name]):
            res[name]["native_over_transformers"] = res[name]["native"][key] / res[name]["transformers"][key]
    from lifecycle.data.manifest import atomic_write_text

    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=2))
    if cfg.plot:
        _plot(report, out.with_suffix(".png"))
    _print(report)
    return report


def _print(report: dict[str, Any]) -> None:
    res = report["results"]
    print(f"\nfp32 matmul {report['machine']['fp32_matmul_gflops']:.0f} GFLOP/s, "
          f"{report['flops_per_token'] / 1e6:.0f} MFLOP/token")
    for backend, r in res.get("w1", {}).items():
        if isinstance(r, dict):
            print(f"W1 {backend:<13} {r['output_tokens_per_s']:8.1f} out tok/s  roofline {r['roofline_fraction']:.1%}")
    for backend, r in res.get("w2", {}).items():
        if isinstance(r, dict):
            print(f"W2 {backend:<13} TTFT {r['ttft_ms']:7.1f} ms  ITL p50 {r['itl_median_ms']:6.2f} ms "
                  f"({r['decode_tokens_per_s']:.1f} tok/s)")
    w3 = res.get("w3", {}).get("native", {})
    if "speedup" in w3:
        print(f"W3 native        speculative {w3['speculative']['tokens_per_s']:.1f} vs plain "
              f"{w3['plain']['tokens_per_s']:.1f} tok/s: speedup {w3['speedup']:.2f}x, "
              f"{w3['speculative']['tokens_per_step']:.2f} tokens/step, acceptance {w3['acceptance_rate'] or 0:.2f}, "
              f"identical outputs: {w3['outputs_identical']}")
    if "w4" in res:
        r = res["w4"]["native"]
        print(f"W4 native        TTFT cold {r['ttft_cold_ms']:.1f} ms, warm {r['ttft_warm_ms']:.1f} ms "
              f"(warm/cold {r['warm_over_cold']:.3f})")


def _plot(report: dict[str, Any], png: Path) -> None:
    from lifecycle.plots import new_figure, save_figure

    res = report["results"]
    fig, axes = new_figure(1, 2, figsize=(9, 3.6))
    for ax, (name, key, label) in zip(axes, (("w1", "output_tokens_per_s", "W1 output tokens/s"),
                                             ("w2", "decode_tokens_per_s", "W2 decode tokens/s (1 stream)"))):
        rows = {b: r[key] for b, r in res.get(name, {}).items() if isinstance(r, dict)}
        ax.bar(list(rows), list(rows.values()), color=["#3b7dd8", "#999999"][:len(rows)])
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    save_figure(fig, png)


def add_action(actions: Any) -> None:
    """`lmforge bench engine` (registered under the `bench` group of lifecycle/bench.py)."""
    from lifecycle.cli import add_subcommand
    from lifecycle.config import add_config_arguments

    parser = add_subcommand(
        actions, "engine", help="engine workloads W1 (throughput), W2 (latency), W4 (prefix cache) vs transformers",
        description=__doc__, example="lmforge bench engine --workloads w1 w2 --output runs/bench/engine.json")
    add_config_arguments(parser, BenchEngineConfig)
    parser.set_defaults(func=_run)


def _run(args: Any) -> int:
    from lifecycle.config import config_from_args

    bench_engine(config_from_args(BenchEngineConfig, args))
    return 0
