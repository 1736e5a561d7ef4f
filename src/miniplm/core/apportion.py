"""Integer shares of a whole: how many instances (or tokens) each domain gets of a selection or a sample."""

from __future__ import annotations

import numpy as np


def largest_remainder(total: int, weights) -> np.ndarray:
    """`total` split into integers proportional to `weights` (Hamilton's method): each gets the floor of its exact
    share, and what the floors leave goes one by one to the largest remainders, ties to the lower index. All-zero
    weights get nothing."""
    weights = np.asarray(weights, dtype=np.float64)
    if np.any(weights < 0) or not np.all(np.isfinite(weights)):
        raise ValueError(f"shares need finite weights >= 0, got {weights.tolist()}")
    if weights.sum() == 0:
        return np.zeros(len(weights), dtype=np.int64)
    exact = total * weights / weights.sum()
    shares = np.floor(exact).astype(np.int64)
    for d in np.argsort(-(exact - shares), kind="stable")[: total - int(shares.sum())]:
        shares[d] += 1
    return shares
