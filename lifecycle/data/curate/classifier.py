"""A fast linear quality classifier: hashed n-gram features + logistic regression, numpy only.

Features (the "hashing trick", Weinberger et al. 2009): word unigrams and bigrams of the lower-cased
text, plus character 2- and 3-grams of CJK runs (Chinese has no spaces to split on), hashed into
`2**num_bits` buckets with a sign hash so collisions cancel in expectation; counts are log-scaled
and the row L2-normalized. The model is logistic regression p(good | x) = sigmoid(w . x + b), fitted
by mini-batch SGD with L2 regularization on the examples a user provides (`--good`, `--bad`); a
held-out 10% reports accuracy. Vectors are sparse (ids, values), so memory is per feature, not 2**num_bits per text. Saved as .npz: weights, bias, num_bits, ngram settings.

The same role as fastText's classifier in DCLM / FineWeb-Edu pipelines, without a download.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from datatrove.data import Document

from lifecycle.data.curate.config import ClassifierConfig
from lifecycle.data.curate.step import CurateStep, Verdict
from lifecycle.errors import DataError

NUM_BITS = 18
_WORD = re.compile(r"[^\W\d_]+|\d+", re.UNICODE)
_CJK_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\u3040-\u30ff]+")


def features(text: str) -> list[str]:
    text = text.lower()
    words = [w for w in _WORD.findall(_CJK_RUN.sub(" ", text))]
    feats = [f"w:{w}" for w in words] + [f"b:{a} {b}" for a, b in zip(words, words[1:])]
    for run in _CJK_RUN.findall(text):
        feats += [f"c2:{run[i:i + 2]}" for i in range(len(run) - 1)]
        feats += [f"c3:{run[i:i + 3]}" for i in range(len(run) - 2)]
    return feats


Sparse = tuple[np.ndarray, np.ndarray]  # (feature ids (k,) int64, unique; values (k,) float32)


def vectorize_one(text: str, num_bits: int = NUM_BITS) -> Sparse:
    """One text -> its hashed, signed, log-scaled, L2-normalized feature vector, as (ids, values)."""
    mask = (1 << num_bits) - 1
    hashes = np.fromiter((zlib.crc32(f.encode("utf-8")) for f in features(text)), dtype=np.int64)
    if hashes.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    signs = np.where((hashes >> 31) & 1, 1.0, -1.0)
    ids, inverse = np.unique(hashes & mask, return_inverse=True)
    values = np.zeros(len(ids), dtype=np.float64)
    np.add.at(values, inverse, signs)
    values = np.copysign(np.log1p(np.abs(values)), values)
    norm = np.linalg.norm(values)
    return ids, (values / norm if norm > 0 else values).astype(np.float32)


def sigmoid(z: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


def logit(w: np.ndarray, b: float, x: Sparse) -> float:
    return float(w[x[0]] @ x[1]) + b


def fit(xs: Sequence[Sparse], y: np.ndarray, num_bits: int = NUM_BITS, *, epochs: int = 5, lr: float = 0.5,
        l2: float = 1e-6, seed: int = 0) -> tuple[np.ndarray, float]:
    """Logistic regression by SGD on log loss, one example at a time; y (n,) in {0, 1}. Returns (w (dim,), b)."""
    rng = np.random.default_rng(seed)
    w = np.zeros(1 << num_bits, dtype=np.float64)
    b = 0.0
    for _ in range(epochs):
        for i in rng.permutation(len(y)):
            ids, values = xs[i]
            grad = float(sigmoid(logit(w, b, xs[i]))) - y[i]  # d(logloss)/d(logit)
            w[ids] -= lr * (grad * values + l2 * w[ids])  # L2 applied lazily to the touched weights
            b -= lr * grad
    return w, b


def predict(model: dict, texts: Sequence[str]) -> np.ndarray:
    num_bits = int(model["num_bits"])
    return np.array([sigmoid(logit(model["w"], float(model["b"]), vectorize_one(t, num_bits))) for t in texts])


def load_model(path: str | Path) -> dict:
    try:
        with np.load(path) as data:
            return {k: data[k] for k in ("w", "b", "num_bits")}
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{path}: not a quality classifier from `lmforge curate train-classifier` ({err})") from None


def train_from_files(good: Sequence[str], bad: Sequence[str], output: str, *, text_field: str = "text",
                     epochs: int = 5, seed: int = 0, num_bits: int = NUM_BITS) -> tuple[dict, dict]:
    from lifecycle.data.readers import iter_documents

    # .txt examples: one per line (jsonl/csv/parquet: one per record)
    pos = [d.text for d in iter_documents(list(good), text_field=text_field, txt_mode="line")]
    neg = [d.text for d in iter_documents(list(bad), text_field=text_field, txt_mode="line")]
    if len(pos) < 2 or len(neg) < 2:
        raise DataError(f"need at least 2 good and 2 bad examples, got {len(pos)} good and {len(neg)} bad")
    texts, y = pos + neg, np.array([1.0] * len(pos) + [0.0] * len(neg))
    order = np.random.default_rng(seed).permutation(len(y))
    num_heldout = max(1, len(y) // 10)
    held, train = order[:num_heldout], order[num_heldout:]
    xs = [vectorize_one(t, num_bits) for t in texts]
    w, b = fit([xs[i] for i in train], y[train], num_bits, epochs=epochs, seed=seed)
    accuracy = float(np.mean([(sigmoid(logit(w, b, xs[i])) >= 0.5) == (y[i] == 1) for i in held]))
    w, b = fit(xs, y, num_bits, epochs=epochs, seed=seed)  # the saved model sees every example
    model = {"w": w.astype(np.float32), "b": np.float32(b), "num_bits": np.int64(num_bits)}
    tmp = Path(output).with_name(f".{Path(output).name}.tmp.npz")
    np.savez(tmp, **model)
    tmp.replace(output)
    return model, {"heldout_accuracy": accuracy, "num_heldout": num_heldout, "num_train": len(train)}


class ClassifierFilter(CurateStep):
    block = "classifier"
    name = "🧪 quality classifier"

    def __init__(self, config: ClassifierConfig, work_dir: str, samples_per_reason: int = 5) -> None:
        super().__init__(work_dir, samples_per_reason)
        self.config = config
        self._model = None

    def setup(self) -> None:
        if self._model is None:
            self._model = load_model(self.config.model)

    def process(self, doc: Document) -> Verdict:
        score = float(predict(self._model, [doc.text])[0])
        doc.metadata["quality_score"] = round(score, 4)
        return Verdict() if score >= self.config.min_score else Verdict.remove("low_quality_score")
