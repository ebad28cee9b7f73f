"""A minimal OpenAI-compatible HTTP front (POST /v1/completions, GET /v1/models) over lmforge's gRPC client,
for testing OpenAITarget against the OpenAI API's shapes while the real HTTP endpoint is built elsewhere.

Completions follow the OpenAI legacy API: `prompt` a string, a list of token ids, or a list of either;
with `echo`, the choice's text and logprobs start with the prompt (its first token has logprob null);
`logprobs: {tokens, token_logprobs, top_logprobs, text_offset}`. `fail_next = N` answers the next N
requests with HTTP 503 (to test retries).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from serve.client import Client


class OpenAIShim:
    def __init__(self, grpc_target: str) -> None:
        self.client = Client(grpc_target, timeout_s=120)
        self.info = self.client.model_info()
        self.fail_next = 0
        self.num_requests = 0
        self._lock = threading.Lock()
        shim = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                if self.path != "/v1/models":
                    return self._send(404, {"error": {"message": "not found"}})
                self._send(200, {"object": "list", "data": [{"id": shim.info.name, "object": "model",
                                                             "max_model_len": shim.info.max_model_len}]})

            def do_POST(self):
                with shim._lock:
                    shim.num_requests += 1
                    fail = shim.fail_next > 0
                    shim.fail_next -= fail
                if fail:
                    return self._send(503, {"error": {"message": "overloaded"}})
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/completions" or body.get("model") != shim.info.name:
                    return self._send(400, {"error": {"message": f"unknown model {body.get('model')}"}})
                self._send(200, shim.completions(body))

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def completions(self, body: dict) -> dict:
        prompt = body["prompt"]
        prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
        echo, logprobs = body.get("echo", False), body.get("logprobs")
        sampling = dict(max_tokens=body.get("max_tokens", 16), temperature=body.get("temperature", 1.0),
                        stop=body.get("stop") or [])
        if logprobs is not None:
            sampling["logprobs"] = logprobs
            if echo:
                sampling["prompt_logprobs"] = logprobs
        choices = []
        for index, p in enumerate(prompts):
            response = self.client.generate(p if isinstance(p, str) else list(p), **sampling)
            completion = response.completions[0]
            choice = {"index": index, "text": completion.text, "finish_reason": "length"}
            if logprobs is not None:
                positions: list[tuple] = []
                if echo:
                    first = self.client.detokenize([response.prompt_token_ids[0]], skip_special_tokens=False)
                    positions = [(first, None, None)] + [
                        (pos.chosen.text, pos.chosen.logprob, {t.text: t.logprob for t in pos.top})
                        for pos in response.prompt_logprobs[1:]]
                    choice["text"] = self.client.detokenize(response.prompt_token_ids) + completion.text
                positions += [(pos.chosen.text, pos.chosen.logprob, {t.text: t.logprob for t in pos.top})
                              for pos in completion.logprobs]
                offsets, offset = [], 0
                for text, _, _ in positions:
                    offsets.append(offset)
                    offset += len(text)
                choice["logprobs"] = {"tokens": [p[0] for p in positions], "token_logprobs": [p[1] for p in positions],
                                      "top_logprobs": [p[2] for p in positions], "text_offset": offsets}
            choices.append(choice)
        return {"id": "cmpl-shim", "object": "text_completion", "model": self.info.name, "choices": choices}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.client.close()
