"""`lmforge eval`: evaluate a served model on tasks declared in YAML/JSON files over local data.

The target is lmforge's gRPC server (`grpc://host:port`) or any OpenAI-compatible server
(`http://host:port/v1`, via /v1/completions with echo + logprobs, as lm-evaluation-harness's
local-completions). Tasks are files (see serve/evaluation/task.py) or names of the shipped ones
(serve/evaluation/tasks/: arc_easy, hellaswag, mmlu, gsm8k, wikitext2 ...), whose data paths are relative
to `--data-root` (e.g. ../shared/data).

Every finished item is appended to a cache beside the report (`<output>.items.jsonl`): rerunning the same
command after a crash or Ctrl-C asks only the items not yet answered. The report (JSON, written
atomically) holds the metrics and every item's answer; a table is printed at the end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lifecycle.errors import ConfigError


@dataclass
class EvalConfig:
    target: str | None = field(default=None, metadata={"help": "grpc://host:port (lmforge serve) or http://host:port/v1 (OpenAI-compatible)"})
    task: list[str] = field(default_factory=list, metadata={"help": "task files or built-in task names (several allowed)"})
    data_root: str | None = field(default=None, metadata={"help": "folder the tasks' relative data paths start from (default $LMFORGE_DATA_ROOT, else the task file's folder)"})
    limit: int | None = field(default=None, metadata={"help": "evaluate only the first N items of each task"})
    concurrency: int = field(default=8, metadata={"help": "requests in flight at once"})
    max_attempts: int = field(default=8, metadata={"help": "tries per item on UNAVAILABLE / RESOURCE_EXHAUSTED / HTTP 429 and 5xx, with exponential backoff"})
    output: str = field(default="eval_report.json", metadata={"help": "JSON report path"})
    cache: str | None = field(default=None, metadata={"help": "per-item cache for resuming (default: <output>.items.jsonl)"})
    resume: bool = field(default=True, metadata={"help": "reuse answers cached by an earlier run of the same tasks and model"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar (stderr)"})
    auth_token_env: str | None = field(default=None, metadata={"help": "environment variable holding the bearer token / API key"})
    auth_token_file: str | None = field(default=None, metadata={"help": "file holding the bearer token / API key"})
    tokenizer: str | None = field(default=None, metadata={"help": "OpenAI targets: the model's tokenizer folder, to send token ids as lm-eval does"})
    model: str | None = field(default=None, metadata={"help": "OpenAI targets: the model name (default: the first of /v1/models)"})
    max_length: int | None = field(default=None, metadata={"help": "OpenAI targets: the model's context length (default: from /v1/models, else 2048)"})
    timeout_s: float = field(default=600.0, metadata={"help": "deadline of one request"})

    def __post_init__(self) -> None:
        if not self.target:
            raise ConfigError("--target: give the server, e.g. grpc://127.0.0.1:50051 or http://127.0.0.1:8000/v1")
        if not self.target.startswith(("grpc://", "grpcs://", "http://", "https://")):
            raise ConfigError(f"--target {self.target}: use grpc://host:port (lmforge serve) or "
                              "http://host:port/v1 (an OpenAI-compatible server)")
        if not self.task:
            raise ConfigError("--task: give at least one task file or built-in task name (e.g. arc_easy)")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit: must be >= 1, got {self.limit}")
        if self.concurrency < 1:
            raise ConfigError(f"--concurrency: must be >= 1, got {self.concurrency}")
        if self.auth_token_env and self.auth_token_file:
            raise ConfigError("--auth-token-env and --auth-token-file: give one source of the token")
        from lifecycle.data.manifest import check_output_file

        check_output_file(self.output)  # before the cache path, which derives from it
        check_output_file(self.cache_path(), "--cache")
        self.token()  # a named source that holds no token is refused now, before anything is sent

    def token(self) -> str | None:
        from serve.api.auth import read_bearer_token

        return read_bearer_token(self.auth_token_file, self.auth_token_env)

    def cache_path(self) -> Path:
        return Path(self.cache) if self.cache else Path(self.output).with_suffix(".items.jsonl")


def evaluate(cfg: EvalConfig, *, print_fn: Any = print) -> dict[str, Any]:
    """Run every task of `cfg` against its target; write the report and return it."""
    from serve.evaluation.cache import ResultCache
    from serve.evaluation.data_root import DataRoot
    from serve.evaluation.dataset import load_items
    from serve.evaluation.report import build_report, format_table, write_report
    from serve.evaluation.retry import RetryPolicy, call_with_retries
    from serve.evaluation.runner import run_task
    from serve.evaluation.target import TargetError, TransientError, open_target
    from serve.evaluation.task import load_task

    specs = [load_task(t) for t in cfg.task]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"--task: two tasks are named the same ({', '.join(names)}); rename one (name:)")
    data_root = cfg.data_root or os.environ.get("LMFORGE_DATA_ROOT")
    # Items first: a task whose data is missing or lacks a column fails before any request is sent.
    task_items = [(spec, load_items(spec, DataRoot(data_root, fallback=Path(spec.source).parent), limit=cfg.limit))
                  for spec in specs]
    cache = ResultCache(cfg.cache_path())
    if not cfg.resume:
        cache.clear()
    target = open_target(cfg.target, token=cfg.token(), tokenizer=cfg.tokenizer, model=cfg.model,
                         max_length=cfg.max_length, timeout_s=cfg.timeout_s)
    try:
        try:  # a server still starting answers UNAVAILABLE for a while: the same retries as any request
            description = call_with_retries(target.describe, RetryPolicy(max_attempts=cfg.max_attempts))
        except TransientError as err:
            raise TargetError(f"cannot reach {cfg.target}: {err}") from None
        runs = []
        for spec, items in task_items:
            run = run_task(spec, items, target, cache=cache, concurrency=cfg.concurrency,
                           retry=RetryPolicy(max_attempts=cfg.max_attempts), progress=cfg.progress)
            if run.num_cached:
                print_fn(f"{spec.name}: {run.num_cached} of {len(items)} items taken from {cache.path}")
            runs.append(run)
    finally:
        cache.close()
        target.close()
    report = build_report(description, runs)
    write_report(cfg.output, report)
    print_fn(f"model {description.get('model')} at {description.get('target')}")
    print_fn(format_table(runs))
    print_fn(f"report: {cfg.output}")
    return report


def add_command(sub: Any) -> None:
    from lifecycle.cli import add_subcommand
    from lifecycle.config import add_config_arguments

    parser = add_subcommand(sub, "eval", help="evaluate a served model (multiple choice, perplexity, generation)",
                            description=__doc__,
                            example="lmforge eval --target grpc://127.0.0.1:50051 --task arc_easy hellaswag "
                                    "--data-root ../shared/data --limit 200")
    parser.add_argument("--config", metavar="FILE", help="YAML file of these options (flags override it)")
    add_config_arguments(parser, EvalConfig)
    parser.set_defaults(func=_run)


def _run(args: Any) -> int:
    from lifecycle.config import config_from_args

    evaluate(config_from_args(EvalConfig, args))
    return 0
