"""The benches' percentile: nearest rank (with 20 runs, p99 is the slowest run)."""

from __future__ import annotations

import math


def nearest_rank(values: list[float], fraction: float) -> float:
    """The smallest value with at least `fraction` of `values` at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]
