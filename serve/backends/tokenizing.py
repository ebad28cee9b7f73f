"""The tokenizer side of the Backend protocol (tokenize, render_chat, detokenize), one implementation for every
backend: a prompt must become the same token ids, and bad input the same error, whichever engine serves it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from serve.backends.base import ChatMessage
from serve.types import InvalidRequestError


def tokenize(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a text prompt, as LLMEngine.add_request encodes it (no special tokens added)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def render_chat(tokenizer: Any, messages: Sequence[ChatMessage], served: str) -> list[int]:
    """The conversation through the chat template with a generation prompt; `served` names what is served
    (e.g. "checkpoint (name)") in the error when there is no template."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("chat", f"the served {served} has no chat template (tokenizer_config.json "
                                          "'chat_template'): send a text prompt")
    try:
        text = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                             tokenize=False, add_generation_prompt=True)
    except Exception as err:  # noqa: BLE001 - jinja raises what templates raise (e.g. "roles must alternate")
        raise InvalidRequestError("chat", f"the chat template refused the conversation: {err}") from None
    return tokenize(tokenizer, text)


def detokenize(tokenizer: Any, token_ids: Sequence[int], vocab_size: int, *, skip_special_tokens: bool = True) -> str:
    bad = sorted({t for t in token_ids if not 0 <= t < vocab_size})
    if bad:
        raise InvalidRequestError("token_ids", f"{bad[:8]} are not in the vocabulary (0 <= id < {vocab_size})")
    return tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
