"""Tokenize-and-pack for causal-LM pretraining.

Documents are tokenized, each followed by EOS, concatenated into one stream and cut into blocks of
`seq_len` tokens (GPT-2/nanoGPT style packing: no padding, every token carries loss; a block may span
a document boundary, and EOS tells the model where one ends). The remainder shorter than a block is
dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from lifecycle.errors import DataError


def _batched(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_stream(texts: Iterable[str], tokenizer, *, batch_size: int = 512,
                    doc_lengths: list[int] | None = None) -> tuple[np.ndarray, int]:
    """All texts as one int32 token stream with EOS after each; returns (stream, num_documents).
    `doc_lengths`, when given, receives each document's token count (EOS included), in order."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token; packing needs one to mark document ends")
    pieces: list[np.ndarray] = []
    num_docs = 0
    for batch in _batched(texts, batch_size):
        # The Rust tokenizer directly: no truncation warnings for documents longer than the model's
        # context (packing cuts them into blocks anyway), and no Python-side overhead.
        for enc in tokenizer.backend_tokenizer.encode_batch(batch, add_special_tokens=False):
            pieces.append(np.asarray(enc.ids + [eos], dtype=np.int32))
            if doc_lengths is not None:
                doc_lengths.append(len(pieces[-1]))
        num_docs += len(batch)
    if not pieces:
        return np.zeros(0, dtype=np.int32), 0
    return np.concatenate(pieces), num_docs


def pack_blocks(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """(num_tokens,) -> (num_blocks, seq_len); the tail shorter than seq_len is dropped."""
    num_blocks = len(stream) // seq_len
    return stream[: num_blocks * seq_len].reshape(num_blocks, seq_len)  # (num_blocks, seq_len)
