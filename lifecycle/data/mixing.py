"""Weighted, deterministic mixing of several data sources (`domain.jsonl:0.2,general.jsonl:0.8`).

`plan_mix` decides how many examples each source contributes and which ones: a pure function of the
source sizes, the weights, the total and the seed, so a resumed run and a rerun see the same data. By
default the total is the largest one no source has to repeat for (each source's share exactly its
weight, the most plentiful ones subsampled); a larger `total` repeats the scarce sources epoch by epoch,
each epoch in a fresh seeded order. The mix actually used (examples and tokens per source) is recorded
in the dataset manifest by the recipes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lifecycle.errors import ConfigError


@dataclass(frozen=True)
class Source:
    path: str
    weight: float


def parse_sources(specs: list[str] | str) -> list[Source]:
    """`["a.jsonl:0.2,b.jsonl:0.8"]`, `["a.jsonl:1", "b/"]` or `"a.jsonl"` -> Sources (weights normalized).

    A source without a weight gets 1 before normalization; a path containing ':' keeps it when the part
    after the last ':' is not a number.
    """
    items = [part.strip() for spec in ([specs] if isinstance(specs, str) else specs) for part in spec.split(",")]
    sources = []
    for item in (i for i in items if i):
        path, sep, tail = item.rpartition(":")
        try:
            weight = float(tail) if sep else None
        except ValueError:
            weight = None
        if weight is None:
            path, weight = item, 1.0
        if not weight > 0 or weight != weight or weight == float("inf"):
            raise ConfigError(f"--data: weight of {path!r} must be a positive number, got {tail!r}")
        sources.append(Source(path, weight))
    if not sources:
        raise ConfigError("--data: no training data given (e.g. --data domain.jsonl:0.2,general.jsonl:0.8)")
    if len({s.path for s in sources}) != len(sources):
        raise ConfigError("--data: a source is listed twice; give each file once with its weight")
    total = sum(s.weight for s in sources)
    return [Source(s.path, s.weight / total) for s in sources]


def mix_counts(sizes: list[int], weights: list[float], total: int | None = None) -> list[int]:
    """Examples taken from each source: proportional to `weights`, summing to `total` (largest remainder).

    Without `total`: the largest total for which no source needs more examples than it has.
    """
    if any(n <= 0 for n in sizes):
        raise ConfigError("a data source has no usable examples; remove it from --data")
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    if total is None:
        total = int(np.floor(min(n / wi for n, wi in zip(sizes, w)) + 1e-9))
    exact = w * total
    counts = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]


def pick(size: int, count: int, seed: int, source_index: int) -> np.ndarray:
    """`count` indices into a source of `size` examples: successive seeded permutations (epochs)."""
    out, epoch = [], 0
    while sum(len(o) for o in out) < count:
        perm = np.random.default_rng([seed, source_index, epoch]).permutation(size)
        out.append(perm[: count - sum(len(o) for o in out)])
        epoch += 1
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def plan_mix(sizes: list[int], weights: list[float], *, seed: int, total: int | None = None
             ) -> list[tuple[int, int]]:
    """The mixed dataset as (source index, example index) pairs, in a seeded interleaved order."""
    counts = mix_counts(sizes, weights, total)
    pairs = [(s, int(i)) for s, (size, count) in enumerate(zip(sizes, counts)) for i in pick(size, count, seed, s)]
    order = np.random.default_rng([seed, 1 << 20]).permutation(len(pairs))
    return [pairs[i] for i in order]
