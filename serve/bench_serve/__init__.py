"""`lmforge bench serve`: N concurrent streaming gRPC clients against a real server, next to the same
workload on the in-process engine.

Workload (as `bench engine` W1): random token-id prompts of `--prompt-len` tokens, `--output-len` output
tokens each, greedy, EOS ignored; the random-init `small` preset by default (or `--model`). For every N in
`--concurrency` (1, 8, 64, 256), N closed-loop clients send max(N, `--min-requests`) requests, each a
GenerateStream; reported per N: output tokens/s, time to first token and inter-token latency p50/p90/p99,
and failed requests by gRPC status. Right after each gRPC level, the same prompts run through the server's
engine in this process (AsyncEngine, the same EngineConfig, the same load generator; it sits idle while
the gRPC level runs, as the server does in turn), and the report gives gRPC / in-process throughput per N (issue 4's goal: >= 90% at 64 clients; 256 clients with zero errors: the bench's server
admits max(N) requests at once and queues as many). `--backend` is a list (native now; vLLM later), run one
after the other. `--target host:port` measures a server already running instead.

Where the clients run, and why: the server is its own process (`python -m serve serve`, the command people
deploy), and the clients are grpc.aio coroutines in the bench's process, one channel each. Clients in the
server's process would share its GIL with the server's event loop and the engine thread, so every
protobuf parse and timestamp of 256 clients would be charged to the server, a cost no deployment has. A
separate client process still takes CPU on a 2-core machine — real clients on the same host would too —
so the report gives the CPU seconds of each side per level (`client_cpu_s`, `server_cpu_s`, and `cpu_s`
in-process; the server's is read from /proc in 10 ms clock ticks, so a very short level may show 0) to show
how much of the machine the client took. Levels and sides run one after another, never
at once (two loads on 2 cores distort each other by 2-8x), and the two sides of one N back to back, so load
from elsewhere that comes and goes weighs on both sides of a ratio alike.

Writes the JSON report (`--output`), a markdown table beside it (.md, also printed), a PNG of throughput
and p50/p99 latency against N (.png), and each started server's log (.<backend>.server.log).
"""

from serve.bench_serve.config import BACKENDS, BenchServeConfig
from serve.bench_serve.run import add_action, bench_serve

__all__ = ["BACKENDS", "BenchServeConfig", "add_action", "bench_serve"]
