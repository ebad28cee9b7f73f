"""Greedy agreement between two engines' outputs for the same prompts.

Once two greedy decoders pick different tokens their contexts differ and the rest of the sequence need not
match, so agreement is measured up to the first difference, not position by position.
"""

from __future__ import annotations

from typing import Any


def first_divergence(reference: list[int], other: list[int]) -> int | None:
    """Index of the first position where the two differ (or where one ends early); None when identical."""
    for i, (a, b) in enumerate(zip(reference, other)):
        if a != b:
            return i
    return None if len(reference) == len(other) else min(len(reference), len(other))


def greedy_agreement(reference: list[list[int]], other: list[list[int]]) -> dict[str, Any]:
    """identical_fraction: sequences equal token for token; prefix_fraction: mean share of each reference
    sequence produced before the first difference; first_divergence: per sequence, None when identical."""
    if not reference:
        raise ValueError("no sequences to compare")
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference sequences vs {len(other)}: not the same prompts")
    divergence = [first_divergence(r, o) for r, o in zip(reference, other)]
    prefix = [(len(r) if d is None else d) / len(r) for r, d in zip(reference, divergence) if r]
    return {"identical_fraction": sum(d is None for d in divergence) / len(divergence),
            "prefix_fraction": sum(prefix) / len(prefix) if prefix else 1.0,
            "first_divergence": divergence}
