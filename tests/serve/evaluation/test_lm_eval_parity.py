"""Parity with lm-evaluation-harness: the same checkpoint and task, `lmforge eval` through the server against
lm-eval 0.4.13 running the model in-process (HFLM, fp32), with lm-eval task YAML built from our task files
(same prompt template, choices, target delimiter; lm-eval reads the same data). And lm-eval's own
`local-completions` model pointed at our OpenAI endpoint against its in-process run.

Tolerances: per-continuation log-likelihoods agree within 1e-4 absolute (two fp32 implementations summing
~20-100 token logprobs; measured ~2e-5), is-greedy flags and acc / acc_norm agree exactly; rolling
log-likelihoods of whole WikiText articles (thousands of tokens) within 1e-6 relative. lm-eval's HFLM is given
max_length = the served context - 2, the window our server scores (it must generate one token after a prompt
of at most max_model_len - 1), so both cut the same windows (multiple-choice prompts here are far shorter).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from serve.evaluation.cli import EvalConfig, evaluate
from serve.evaluation.data_root import DataRoot
from serve.evaluation.dataset import load_items
from serve.evaluation.task import load_task

pytestmark = pytest.mark.shared_data
REPO = Path(__file__).resolve().parents[3]
MC_LIMIT, PPL_LIMIT = 40, 3


@pytest.fixture(scope="module")
def lm_eval_tasks(eval_server, shared_data, tmp_path_factory) -> Path:
    """lm-eval task YAML: lmforge_arc_easy and lmforge_wikitext, from our arc_easy and wikitext2 task files."""
    task_dir = tmp_path_factory.mktemp("lm_eval_tasks")
    arc = load_task("arc_easy")
    (task_dir / "lmforge_arc_easy.yaml").write_text(yaml.safe_dump({
        "task": "lmforge_arc_easy", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(shared_data / arc.data[0])}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": arc.prompt, "doc_to_choice": "{{" + arc.choices + "}}",
        "doc_to_target": arc.gold, "target_delimiter": arc.target_delimiter,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")]}))
    # The articles exactly as our wikitext2 task cuts them, as lm-eval documents.
    docs = task_dir / "wikitext_docs.jsonl"
    items = load_items(load_task("wikitext2"), DataRoot(shared_data), limit=PPL_LIMIT)
    docs.write_text("".join(json.dumps({"text": item.request.text}) + "\n" for item in items))
    (task_dir / "lmforge_wikitext.yaml").write_text(yaml.safe_dump({
        "task": "lmforge_wikitext", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(docs)}},
        "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
        "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]}))
    return task_dir


def _lm_eval(task_dir: Path, name: str, **spec) -> dict:
    """Run lm-eval (tests/serve/evaluation/lm_eval_reference.py) in a subprocess on both tasks."""
    run_dir = task_dir / name
    run_dir.mkdir()
    for task in task_dir.glob("*.yaml"):
        (run_dir / task.name).write_text(task.read_text())
    spec_file = run_dir / "spec.json"
    spec_file.write_text(json.dumps({"task_dir": str(run_dir), "tasks": ["lmforge_arc_easy", "lmforge_wikitext"],
                                     "limit": MC_LIMIT, **spec}))
    out = run_dir / "out.json"
    run = subprocess.run([sys.executable, "-m", "tests.serve.evaluation.lm_eval_reference", str(spec_file), str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def max_model_len(eval_server) -> int:
    with eval_server.client() as client:
        return client.model_info().max_model_len


@pytest.fixture(scope="module")
def lm_eval_run(trained_checkpoint, lm_eval_tasks, max_model_len) -> dict:
    """lm-eval with the checkpoint in-process: arc_easy (the first 40 items), wikitext (the first 3 articles)."""
    run = _lm_eval(lm_eval_tasks, "hf", checkpoint=str(trained_checkpoint), max_length=max_model_len - 2)
    return {"max_model_len": max_model_len, **run}


def _ours(eval_server, shared_data, tmp_path, task, limit):
    cfg = EvalConfig(target=f"grpc://{eval_server.target}", task=[task], data_root=str(shared_data), limit=limit,
                     output=str(tmp_path / "ours.json"), progress=False)
    return evaluate(cfg, print_fn=lambda _: None)["tasks"][task]


def test_multiple_choice_matches_lm_eval(lm_eval_run, eval_server, shared_data, tmp_path):
    theirs = lm_eval_run["lmforge_arc_easy"]
    ours = _ours(eval_server, shared_data, tmp_path, "arc_easy", MC_LIMIT)
    assert len(ours["items"]) == len(theirs["samples"]) == MC_LIMIT
    worst = 0.0
    for item, sample in zip(ours["items"], theirs["samples"]):
        lm_eval_lls = [float(ll) for ll, _ in sample["resps"]]
        assert item["answer"]["logprobs"] == pytest.approx(lm_eval_lls, abs=1e-4), item["where"]
        assert item["answer"]["is_greedy"] == [bool(g) for _, g in sample["resps"]]
        worst = max(worst, *(abs(a - b) for a, b in zip(item["answer"]["logprobs"], lm_eval_lls)))
    assert ours["metrics"]["acc"] == pytest.approx(theirs["results"]["acc,none"], abs=1e-12)
    assert ours["metrics"]["acc_norm"] == pytest.approx(theirs["results"]["acc_norm,none"], abs=1e-12)
    print(f"arc_easy[:{MC_LIMIT}] acc {ours['metrics']['acc']:.3f} acc_norm {ours['metrics']['acc_norm']:.3f}, "
          f"max |Δ log-likelihood| {worst:.2e}")


def test_rolling_perplexity_matches_lm_eval(lm_eval_run, eval_server, shared_data, tmp_path):
    theirs = lm_eval_run["lmforge_wikitext"]
    ours = _ours(eval_server, shared_data, tmp_path, "wikitext2", PPL_LIMIT)
    assert len(ours["items"]) == len(theirs["samples"]) == PPL_LIMIT
    for item, sample in zip(ours["items"], theirs["samples"]):
        assert item["answer"]["num_tokens"] > lm_eval_run["max_model_len"]  # several windows each
        assert item["answer"]["logprob"] == pytest.approx(float(sample["resps"][0]), rel=1e-6)
    for name in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours["metrics"][name] == pytest.approx(theirs["results"][f"{name},none"], rel=1e-5)


def test_lm_eval_local_completions_on_our_openai_endpoint(lm_eval_run, lm_eval_tasks, eval_server,
                                                          trained_checkpoint, max_model_len):
    """lm-eval's `local-completions` (token-id prompts, echo + logprobs) against `lmforge serve --http-port`'s
    /v1/completions gives what lm-eval's in-process run gives: the same tolerances as above. lm-eval's API models
    keep one token for generation and one for context (lm_eval/models/api_models.py: max_length - 1, windows of
    max_length - 2), so max_length = the served context gives the in-process run's windows."""
    from serve.api.openai_http import OpenAIApi

    api = OpenAIApi(eval_server.backend, eval_server.server.admission)
    base_url = eval_server.serve_http(api.app()) + "/v1/completions"
    theirs_api = _lm_eval(lm_eval_tasks, "api", checkpoint=str(trained_checkpoint), base_url=base_url,
                          model=api.model_name, max_length=max_model_len)
    hf, served = lm_eval_run["lmforge_arc_easy"], theirs_api["lmforge_arc_easy"]
    for a, b in zip(served["samples"], hf["samples"]):
        assert [float(ll) for ll, _ in a["resps"]] == pytest.approx([float(ll) for ll, _ in b["resps"]], abs=1e-4)
        assert [bool(g) for _, g in a["resps"]] == [bool(g) for _, g in b["resps"]]
    assert served["results"]["acc,none"] == hf["results"]["acc,none"]
    assert served["results"]["acc_norm,none"] == hf["results"]["acc_norm,none"]
    hf, served = lm_eval_run["lmforge_wikitext"], theirs_api["lmforge_wikitext"]
    for a, b in zip(served["samples"], hf["samples"]):
        assert float(a["resps"][0]) == pytest.approx(float(b["resps"][0]), rel=1e-6)
