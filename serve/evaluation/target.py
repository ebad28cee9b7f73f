"""EvalTarget: a served model that answers evaluation requests; the gRPC one, and how a --target URL picks one.

Call order:

    target = open_target("grpc://127.0.0.1:50051")   # or "http://host:8000/v1" (serve/evaluation/openai_target.py)
    target.describe()                                 # once: what is served (goes into the report and cache key)
    target.answer(request)                            # from many threads at once; one EvalRequest -> one Answer
    target.close()

`answer` raises `TransientError` for failures worth retrying (the server is busy, restarting or briefly
unreachable: gRPC UNAVAILABLE / RESOURCE_EXHAUSTED, HTTP 429 / 5xx, connection refused or reset);
serve/evaluation/retry.py retries those with backoff. Anything else (a request the server refuses as
invalid, an authentication failure) is `TargetError` and stops the run: retrying cannot fix it.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from lifecycle.errors import ConfigError, LmforgeError
from serve.evaluation.items import EvalRequest, GenerationRequest, LoglikelihoodRequest, RollingRequest
from serve.evaluation.results import Answer, GenerationAnswer, LoglikelihoodAnswer, RollingAnswer

MAX_STOP_STRINGS = 16  # the server's limit (serve/types.py MAX_NUM_STOP_STRINGS)


class TransientError(Exception):
    """A failure that may go away: retry with backoff."""


class TargetError(LmforgeError):
    """The target refused a request for good (bad request, auth, unsupported): the run stops, saying why."""


@runtime_checkable
class EvalTarget(Protocol):
    """A served model. See the module docstring for the call order."""

    def describe(self) -> dict[str, Any]:
        """{"target": url, "model": name, ...}: identifies the model for the report and the resume cache."""

    def answer(self, request: EvalRequest) -> Answer:
        """Answer one request; thread-safe."""

    def close(self) -> None: ...


class GrpcTarget:
    """lmforge's own gRPC API: Score for log-likelihoods (both kinds), Generate (greedy) for generation."""

    RETRYABLE = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")

    def __init__(self, address: str, *, tls: bool = False, token: str | None = None,
                 root_certificates: bytes | None = None, timeout_s: float = 600.0) -> None:
        from serve.client import Client

        self.address, self.tls = address, tls
        self.client = Client(address, token=token, tls=tls, root_certificates=root_certificates,
                             timeout_s=timeout_s)

    def describe(self) -> dict[str, Any]:
        import hashlib

        info = self._call(self.client.model_info)
        manifest_hash = hashlib.sha256(info.manifest_json.encode()).hexdigest()[:16] if info.manifest_json else None
        return {"target": f"{'grpcs' if self.tls else 'grpc'}://{self.address}", "api": "lmforge.v1 gRPC",
                "model": info.name, "architecture": info.architecture, "max_model_len": info.max_model_len,
                "dtype": info.dtype, "backend": info.backend,
                # the manifest lists every file's sha256: a cached answer from another model is never reused
                "manifest_sha256": manifest_hash}

    def answer(self, request: EvalRequest) -> Answer:
        if isinstance(request, LoglikelihoodRequest):
            response = self._call(self.client.score, loglikelihood=[(request.context, list(request.continuations))])
            scores = response.loglikelihood[0].continuations
            return LoglikelihoodAnswer(tuple(s.logprob for s in scores), tuple(s.is_greedy for s in scores),
                                       tuple(s.num_tokens for s in scores))
        if isinstance(request, RollingRequest):
            score = self._call(self.client.score, rolling=[request.text]).rolling[0]
            return RollingAnswer(score.logprob, score.num_tokens)
        if isinstance(request, GenerationRequest):
            response = self._call(self.client.generate, request.prompt, max_tokens=request.max_tokens,
                                  temperature=0.0, stop=list(request.until[:MAX_STOP_STRINGS]))
            return GenerationAnswer(response.completions[0].text)
        raise TypeError(f"unknown request {type(request).__name__}")

    def _call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        import grpc

        try:
            return method(*args, **kwargs)
        except grpc.RpcError as err:
            code = err.code().name if err.code() is not None else "UNKNOWN"
            message = f"{self.address}: {code}: {err.details()}"
            if code in self.RETRYABLE:
                raise TransientError(message) from None
            raise TargetError(message) from None

    def close(self) -> None:
        self.client.close()


def open_target(url: str, *, token: str | None = None, tokenizer: str | None = None, model: str | None = None,
                max_length: int | None = None, timeout_s: float = 600.0) -> EvalTarget:
    """`grpc://host:port` (`grpcs://` for TLS), or an OpenAI-compatible base URL `http(s)://host:port/v1`."""
    if url.startswith(("grpc://", "grpcs://")):
        address = url.split("://", 1)[1].rstrip("/")
        if not address or ":" not in address:
            raise ConfigError(f"--target {url}: give host:port, e.g. grpc://127.0.0.1:50051")
        return GrpcTarget(address, tls=url.startswith("grpcs://"), token=token, timeout_s=timeout_s)
    if url.startswith(("http://", "https://")):
        from serve.evaluation.openai_target import OpenAITarget

        return OpenAITarget(url, api_key=token, tokenizer=tokenizer, model=model, max_length=max_length,
                            timeout_s=timeout_s)
    raise ConfigError(f"--target {url}: use grpc://host:port (lmforge serve) or http://host:port/v1 "
                      "(an OpenAI-compatible server)")
