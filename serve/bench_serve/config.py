"""BenchServeConfig: the flags of `lmforge bench serve`, and the backends it knows how to start.

A backend here is a pair: how to start a gRPC server on it (a `lmforge serve` command line) and how to run
the same workload on its engine in-process (the baseline every gRPC number is divided by): `native` (lmforge's
engine) and `vllm` (`lmforge serve --backend vllm`; extra [vllm]). `--backend native,vllm` runs both, one after
the other, through the same gRPC front end. Any other name is refused naming the flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lifecycle.data.manifest import check_output_file
from lifecycle.errors import ConfigError

BACKENDS = ("native", "vllm")  # serve.launch.ServeConfig.backend
DEFAULT_CONCURRENCY = (1, 8, 64, 256)


@dataclass
class BenchServeConfig:
    model: str | None = field(default=None, metadata={
        "help": "checkpoint to serve (default: a random-init `small` preset with the demo tokenizer, as bench engine)"})
    target: str | None = field(default=None, metadata={
        "help": "benchmark a server already running at host:port instead of starting one; the in-process "
                "baseline then runs only with --model (the checkpoint that server serves)"})
    backend: list[str] = field(default_factory=lambda: ["native"], metadata={
        "help": f"server backends, comma or space separated, run one after the other: {', '.join(BACKENDS)}"})
    concurrency: list[int] = field(default_factory=lambda: list(DEFAULT_CONCURRENCY), metadata={
        "help": "numbers of concurrent streaming clients, one measurement each"})
    min_requests: int = field(default=8, metadata={
        "help": "requests per concurrency level at least (each level sends max(N, this) requests; a client "
                "sends its next request when its previous one ends)"})
    prompt_len: int = field(default=128, metadata={"help": "prompt tokens per request (random ids, as bench engine W1)"})
    output_len: int = field(default=128, metadata={"help": "output tokens per request (greedy, EOS ignored)"})
    in_process: bool = field(default=True, metadata={
        "help": "also run each level on the in-process engine (same config) and report grpc / in-process"})
    kv_cache_memory_bytes: int | None = field(default=None, metadata={
        "help": "KV cache of the server and the in-process engine alike (default: the engine's, 1 GiB)"})
    max_num_batched_tokens: int = field(default=2048, metadata={"help": "engine tokens per step (both sides)"})
    timeout_s: float = field(default=900.0, metadata={"help": "deadline of one request"})
    server_start_timeout_s: float = field(default=300.0, metadata={"help": "how long the server may take to load"})
    auth_token_env: str | None = field(default=None, metadata={"help": "--target: environment variable holding its bearer token"})
    auth_token_file: str | None = field(default=None, metadata={"help": "--target: file holding its bearer token"})
    output: str = field(default="runs/bench/serve.json", metadata={"help": "JSON report (.md and .png beside it)"})
    plot: bool = field(default=True, metadata={"help": "write a PNG: throughput and p50/p99 latency against N"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar of finished requests (stderr)"})
    seed: int = field(default=0, metadata={"help": "seed for the random prompts"})

    def __post_init__(self) -> None:
        check_output_file(self.output)
        self.backend = parse_backends(self.backend)
        if not self.concurrency or any(n < 1 for n in self.concurrency):
            raise ConfigError(f"--concurrency: give positive numbers of clients, got {self.concurrency}")
        self.concurrency = sorted(set(self.concurrency))
        for name in ("min_requests", "prompt_len", "output_len", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ConfigError(f"--kv-cache-memory-bytes: must be >= 1, got {self.kv_cache_memory_bytes}")
        for name in ("timeout_s", "server_start_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be > 0, got {getattr(self, name)}")
        if self.target is not None:
            if ":" not in self.target.split("://", 1)[-1]:
                raise ConfigError(f"--target {self.target}: give host:port, e.g. 127.0.0.1:50051")
            if len(self.backend) != 1:
                raise ConfigError("--target and several --backend: a running server is one backend; "
                                  "give the one it runs (for the in-process baseline)")
        elif self.auth_token_env or self.auth_token_file:
            raise ConfigError("--auth-token-env/--auth-token-file: only for --target (a server the bench starts "
                              "needs no token)")
        if self.auth_token_env and self.auth_token_file:
            raise ConfigError("--auth-token-env and --auth-token-file: give one source of the token")

    @property
    def max_concurrency(self) -> int:
        return max(self.concurrency)

    def num_requests(self, num_clients: int) -> int:
        return max(num_clients, self.min_requests)

    def target_address(self) -> str | None:
        """host:port of --target (a grpc:// prefix is allowed)."""
        return None if self.target is None else self.target.split("://", 1)[-1].rstrip("/")


def parse_backends(items: list[str]) -> list[str]:
    """`["native,vllm"]` -> ["native", "vllm"], in order, once each; an unknown name is refused."""
    names = [name.strip() for item in items for name in item.split(",") if name.strip()]
    if not names:
        raise ConfigError(f"--backend: give at least one of {', '.join(BACKENDS)}")
    unknown = [n for n in dict.fromkeys(names) if n not in BACKENDS]
    if unknown:
        raise ConfigError(f"--backend: unknown {unknown}; available: {', '.join(BACKENDS)}")
    return list(dict.fromkeys(names))
