"""OpenAITarget (written against the OpenAI completions API) gives the gRPC target's answers when both reach
the same server — through lmforge's own OpenAI endpoint (serve/api/openai_http.py) and through a minimal
OpenAI-shaped front over gRPC (openai_shim.py, a second, independent reading of the API's shapes);
5xx is retried, 4xx is not."""

from __future__ import annotations

import pytest

from serve.evaluation.data_root import DataRoot
from serve.evaluation.dataset import load_items
from serve.evaluation.openai_target import OpenAITarget
from serve.evaluation.retry import RetryPolicy
from serve.evaluation.runner import run_task
from serve.evaluation.target import GrpcTarget, TargetError
from serve.evaluation.task import load_task

from .openai_shim import OpenAIShim

FAST = RetryPolicy(initial_backoff_s=0.0, max_backoff_s=0.0)


@pytest.fixture(scope="module")
def shim(eval_server):
    front = OpenAIShim(eval_server.target)
    yield front
    front.close()


@pytest.fixture(scope="module", params=["openai_http", "shim"])
def openai_url(request, eval_server, shim) -> str:
    if request.param == "shim":
        return shim.url
    from serve.api.openai_http import OpenAIApi

    return eval_server.serve_http(OpenAIApi(eval_server.backend, eval_server.server.admission).app()) + "/v1"


def _run(task, target, data_root, limit, **kw):
    spec = load_task(str(data_root / task))
    return run_task(spec, load_items(spec, DataRoot(data_root), limit=limit), target, retry=FAST, progress=False, **kw)


@pytest.mark.parametrize("with_tokenizer", [True, False])
def test_loglikelihoods_equal_the_grpc_targets(openai_url, eval_server, data_root, trained_checkpoint, with_tokenizer):
    openai = OpenAITarget(openai_url, tokenizer=str(trained_checkpoint) if with_tokenizer else None)
    assert openai.describe()["model"] and openai.describe()["max_model_len"] == 512  # from GET /v1/models
    ours = _run("mc.yaml", openai, data_root, 10)
    grpc = _run("mc.yaml", GrpcTarget(eval_server.target), data_root, 10)
    for a, b in zip(ours.results, grpc.results):
        assert a.answer.logprobs == pytest.approx(b.answer.logprobs, abs=1e-4)
        assert a.answer.num_tokens == b.answer.num_tokens and a.answer.is_greedy == b.answer.is_greedy
    assert ours.metrics["acc"] == grpc.metrics["acc"] and ours.metrics["acc_norm"] == grpc.metrics["acc_norm"]


def test_rolling_and_generation_equal_the_grpc_targets(openai_url, eval_server, data_root, trained_checkpoint):
    openai = OpenAITarget(openai_url, tokenizer=str(trained_checkpoint))
    grpc = GrpcTarget(eval_server.target)
    ppl_openai, ppl_grpc = (_run("ppl.yaml", t, data_root, 6) for t in (openai, grpc))
    for a, b in zip(ppl_openai.results, ppl_grpc.results):
        assert a.answer.num_tokens == b.answer.num_tokens and a.answer.logprob == pytest.approx(b.answer.logprob, abs=1e-3)
    gen_openai, gen_grpc = (_run("gen.yaml", t, data_root, 4) for t in (openai, grpc))
    assert [r.answer.text for r in gen_openai.results] == [r.answer.text for r in gen_grpc.results]


def test_rolling_needs_the_tokenizer(shim, data_root):
    from lifecycle.errors import ConfigError

    with pytest.raises(ConfigError, match="--tokenizer"):
        _run("ppl.yaml", OpenAITarget(shim.url), data_root, 1)


def test_5xx_is_retried_and_4xx_is_not(shim, data_root, trained_checkpoint):
    shim.fail_next = 3
    run = _run("mc.yaml", OpenAITarget(shim.url, tokenizer=str(trained_checkpoint)), data_root, 4, concurrency=1)
    assert run.num_retries == 3 and len(run.results) == 4
    wrong = OpenAITarget(shim.url, model="no-such-model", max_length=512)
    with pytest.raises(TargetError, match="HTTP 400"):
        wrong.answer(load_items(load_task(str(data_root / "mc.yaml")), DataRoot(data_root), limit=1)[0].request)
