"""Calibration and held-out text: from the user's files or from the checkpoint's own training data.

A checkpoint made by `lmforge pretrain` records its data files, text field and held-out rule in its
manifest (`recipe_config`): calibration reads the training documents, perplexity the held-out ones
(the `--eval-data` files, or the documents the pretrain split held out by hash), so neither ever
mixes the two. Calibration sequences are `num_samples` random, non-overlapping windows of `seq_len`
tokens of the documents joined by EOS, as the GPTQ reference samples C4/WikiText windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lifecycle.checkpoint import Checkpoint
from lifecycle.data.mixing import parse_sources
from lifecycle.errors import DataError


def _recipe_data(ckpt: Checkpoint) -> tuple[list[str], list[str], str, float]:
    rc = (ckpt.manifest or {}).get("recipe_config") or {}
    data = rc.get("data") or []
    if not data:
        raise DataError(f"{ckpt.path}: the manifest names no training data (recipe {ckpt.recipe or 'none'}); "
                        "pass --calibration-data FILE")
    # `lmforge pretrain --data a.jsonl:0.2,b/:0.8` records weighted sources: calibration reads each source's
    # documents (the mixture's shares do not matter for calibration statistics)
    data = [_relocated(ckpt, source.path) for source in parse_sources(list(data))]
    eval_data = [_relocated(ckpt, d) for d in rc.get("eval_data") or []]
    return data, eval_data, rc.get("text_field", "text"), float(rc.get("eval_fraction", 0.0))


def _relocated(ckpt: Checkpoint, recorded: str) -> str:
    """The recorded data path, or — when a run directory was moved with its data (the demo's cache under
    $LMFORGE_HOME) — the same trailing path under one of the checkpoint's parent directories."""
    path = Path(recorded)
    if path.exists():
        return recorded
    parts = path.parts
    for parent in list(ckpt.path.resolve().parents)[:4]:
        for n in (2, 3):
            candidate = parent.joinpath(*parts[-n:])
            if len(parts) >= n and candidate.exists():
                print(f"note: training data {recorded} (manifest) is gone; using {candidate}")
                return str(candidate)
    raise DataError(f"{ckpt.path}: training data {recorded} named in manifest.json is gone; "
                    "pass --calibration-data FILE")


def training_texts(ckpt: Checkpoint) -> list[str]:
    """The documents the checkpoint was trained on (its held-out split excluded)."""
    from lifecycle.data.readers import iter_documents
    from lifecycle.recipes.pretrain import _doc_is_heldout

    data, eval_data, field, fraction = _recipe_data(ckpt)
    texts = [d.text for d in iter_documents(data, text_field=field)]
    return texts if eval_data else [t for t in texts if not _doc_is_heldout(t, fraction)]


def heldout_texts(ckpt: Checkpoint) -> list[str]:
    """The checkpoint's own held-out documents: its --eval-data files or its hash-split share."""
    from lifecycle.data.readers import iter_documents
    from lifecycle.recipes.pretrain import _doc_is_heldout

    data, eval_data, field, fraction = _recipe_data(ckpt)
    if eval_data:
        return [d.text for d in iter_documents(eval_data, text_field=field)]
    return [d.text for d in iter_documents(data, text_field=field) if _doc_is_heldout(d.text, fraction)]


def file_texts(paths: Sequence[str | Path], text_field: str = "text") -> list[str]:
    from lifecycle.data.readers import iter_documents

    return [d.text for d in iter_documents(list(paths), text_field=text_field)]


def token_stream(tokenizer, texts: Sequence[str]) -> np.ndarray:
    from lifecycle.data.packing import tokenize_stream

    stream, _ = tokenize_stream(texts, tokenizer)
    return stream


def calibration_batch(tokenizer, texts: Sequence[str], *, num_samples: int, seq_len: int, seed: int = 0,
                      source: str = "calibration data") -> torch.Tensor:
    """-> (num, seq_len) int64 token ids, num = min(num_samples, windows available).

    Errors (nothing is quantized): no text at all, or fewer tokens than one sequence of seq_len.
    """
    if not texts:
        raise DataError(f"{source}: the calibration set is empty (no non-empty documents)")
    stream = token_stream(tokenizer, texts)
    if len(stream) < seq_len:
        raise DataError(f"{source}: the calibration text is {len(stream)} tokens, shorter than --seq-len {seq_len}; "
                        "give more text or a smaller --seq-len")
    num_windows = len(stream) // seq_len
    rng = np.random.default_rng(seed)
    starts = rng.permutation(num_windows)[:num_samples] * seq_len
    blocks = np.stack([stream[s:s + seq_len] for s in sorted(starts)])  # (num, seq_len)
    return torch.from_numpy(blocks.astype(np.int64))


def eval_blocks(tokenizer, texts: Sequence[str], *, seq_len: int, max_blocks: int, source: str) -> torch.Tensor:
    """Held-out text as consecutive (num_blocks, seq_len) blocks, the first `max_blocks` of them."""
    if not texts:
        raise DataError(f"{source}: no held-out text")
    stream = token_stream(tokenizer, texts)
    num = min(len(stream) // seq_len, max_blocks)
    if num == 0:
        raise DataError(f"{source}: held-out text is {len(stream)} tokens, shorter than one block of {seq_len}")
    return torch.from_numpy(stream[:num * seq_len].astype(np.int64).reshape(num, seq_len))
