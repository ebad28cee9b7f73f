"""`lmforge chat`: chat with a served model in the terminal, over gRPC, the reply streamed as it is generated.

Each line typed (or piped in) is a user turn. The whole conversation — the `--system` prompt first — goes
to the server every turn, which renders it with the checkpoint's chat template. When the conversation no
longer fits the model's context, the oldest turns are dropped (and you are told). Commands:

    /reset   forget the conversation (the system prompt stays)
    /exit    leave (so does end of input, Ctrl-D)

Piped input works as typed input does: `printf 'Hi!\\n/exit\\n' | lmforge chat --target 127.0.0.1:50051`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

from lifecycle.errors import ConfigError, LmforgeError


@dataclass
class ChatConfig:
    target: str = field(default="127.0.0.1:50051", metadata={"help": "the server: host:port or grpc://host:port (grpcs:// for TLS)"})
    system: str | None = field(default=None, metadata={"help": "system prompt, sent first in every turn"})
    max_tokens: int = field(default=256, metadata={"help": "longest reply, in tokens"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature; 0 is greedy"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling"})
    seed: int | None = field(default=None, metadata={"help": "sampling seed, for reproducible replies"})
    auth_token_env: str | None = field(default=None, metadata={"help": "environment variable holding the bearer token"})
    auth_token_file: str | None = field(default=None, metadata={"help": "file holding the bearer token"})
    timeout_s: float = field(default=300.0, metadata={"help": "deadline of one reply"})

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"--max-tokens: must be >= 1, got {self.max_tokens}")
        if self.auth_token_env and self.auth_token_file:
            raise ConfigError("--auth-token-env and --auth-token-file: give one source of the token")
        self.token()  # a named source that holds no token is refused now, before anything is sent

    def token(self) -> str | None:
        from serve.api.auth import read_bearer_token

        return read_bearer_token(self.auth_token_file, self.auth_token_env)

    def address(self) -> tuple[str, bool]:
        """(host:port, TLS?)"""
        target = self.target
        tls = target.startswith("grpcs://")
        target = target.split("://", 1)[1] if "://" in target else target
        if ":" not in target:
            raise ConfigError(f"--target {self.target}: give host:port, e.g. 127.0.0.1:50051")
        return target.rstrip("/"), tls


class ChatSession:
    """The conversation and how to continue it. `send` streams the reply through `on_text` and keeps both turns."""

    def __init__(self, client: Any, *, system: str | None = None, **sampling: Any) -> None:
        self.client = client
        self.system = system
        self.sampling = sampling
        self.turns: list[dict[str, str]] = []
        self._max_model_len: int | None = None

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def reset(self) -> None:
        self.turns = []

    def send(self, text: str, on_text: Callable[[str], None]) -> str:
        import grpc

        self.turns.append({"role": "user", "content": text})
        try:
            dropped = self._fit()
            if dropped:
                on_notice(f"(the conversation outgrew the model's context: dropped the {dropped} oldest turns)")
            parts = []
            for chunk in self.client.stream(self.messages(), **self.sampling):
                for completion in chunk.completions:
                    if completion.text:
                        parts.append(completion.text)
                        on_text(completion.text)
        except grpc.RpcError as err:
            self.turns.pop()  # the turn never happened; the user may rephrase or /reset
            raise LmforgeError(f"the server refused: {err.code().name}: {err.details()}") from None
        reply = "".join(parts)
        self.turns.append({"role": "assistant", "content": reply})
        return reply

    def _fit(self) -> int:
        """Drop the oldest user/assistant pairs until the rendered chat leaves room for a reply."""
        if self._max_model_len is None:
            self._max_model_len = self.client.model_info().max_model_len
        room = min(self.sampling.get("max_tokens", 256), self._max_model_len // 2)
        dropped = 0
        while len(self.turns) > 1 and len(self.client.tokenize(self.messages())) > self._max_model_len - room:
            self.turns = self.turns[2:] if len(self.turns) > 2 else self.turns[1:]
            dropped += 2
        return dropped


def on_notice(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_chat(session: ChatSession, lines: Iterable[str], out: TextIO, *, interactive: bool) -> int:
    """The loop: read a line, handle /commands, stream the reply. Returns the number of replies."""
    num_replies = 0
    prompt = "you> " if interactive else ""
    if interactive:
        out.write("chat: /reset forgets the conversation, /exit leaves\n")
    out.write(prompt)
    out.flush()
    for line in lines:
        text = line.rstrip("\n")
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            session.reset()
            out.write("(conversation reset)\n")
        elif text.strip().startswith("/"):
            out.write(f"unknown command {text.strip()}: /reset or /exit\n")
        elif text.strip():
            out.write("assistant> ")
            out.flush()
            try:
                session.send(text, lambda delta: (out.write(delta), out.flush()))
                num_replies += 1
            except LmforgeError as err:
                out.write(f"\nerror: {err}")
            out.write("\n")
        out.write(prompt)
        out.flush()
    if interactive:
        out.write("\n")
    return num_replies


def _typed_lines() -> Iterable[str]:
    """Lines from the terminal through readline: arrow keys edit, up recalls earlier lines."""
    try:
        import readline  # noqa: F401 - importing it is what turns line editing on for input()
    except ImportError:
        pass
    while True:
        try:
            yield input()
        except EOFError:
            return


def add_command(sub: Any) -> None:
    from lifecycle.cli import add_subcommand
    from lifecycle.config import add_config_arguments

    parser = add_subcommand(sub, "chat", help="chat with a served model in the terminal (gRPC, streamed)",
                            description=__doc__,
                            example="lmforge chat --target 127.0.0.1:50051 --system 'You are terse.' --temperature 0")
    add_config_arguments(parser, ChatConfig)
    parser.set_defaults(func=_run)


def _run(args: Any) -> int:
    from lifecycle.config import config_from_args
    from serve.client import Client

    cfg = config_from_args(ChatConfig, args)
    address, tls = cfg.address()
    with Client(address, token=cfg.token(), tls=tls, timeout_s=cfg.timeout_s) as client:
        try:
            info = client.model_info(timeout_s=30)
        except Exception as err:  # noqa: BLE001 - grpc.RpcError: say where we tried
            raise LmforgeError(f"cannot reach the server at {address}: {getattr(err, 'details', lambda: err)()}") from None
        if not info.has_chat_template:
            raise LmforgeError(f"{info.name} has no chat template, so it cannot chat; serve a chat model "
                               "(trained with lmforge's tokenizer or with a chat_template)")
        session = ChatSession(client, system=cfg.system, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                              top_p=cfg.top_p, seed=cfg.seed)
        interactive = sys.stdin.isatty()
        if interactive:
            print(f"connected to {info.name} at {address}", flush=True)
        try:
            run_chat(session, _typed_lines() if interactive else sys.stdin, sys.stdout, interactive=interactive)
        except KeyboardInterrupt:
            print()
    return 0
