"""Metric functions in seqio's form: fn(targets, predictions) -> {name: value}."""

from __future__ import annotations

from collections.abc import Sequence


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Percentage of predictions equal to their target after stripping surrounding spaces."""
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions.")
    if not targets:
        return {"exact_match": 0.0}
    hits = sum(str(t).strip() == str(p).strip() for t, p in zip(targets, predictions))
    return {"exact_match": 100.0 * hits / len(targets)}
