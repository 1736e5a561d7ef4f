"""The work plan of a scoring run: instances sorted by length, cut into parts, each part into batches.

The plan depends only on the instance lengths and `part_tokens`, never on the number of workers, so one
process, torchrun ranks and Ray actors score exactly the same parts, and a resumed run skips the parts
already on disk. Batches are formed inside a part by a token budget, so changing `batch_tokens` (or the
out-of-memory fallback halving a batch) leaves the plan and the resume state valid.
"""

from __future__ import annotations

import numpy as np


def plan_parts(lengths: np.ndarray, part_tokens: int) -> list[np.ndarray]:
    """Instance indices, longest first (ties by index), cut into parts of about `part_tokens` tokens."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    cumulative = np.cumsum(lengths[order])
    part_of = cumulative // max(part_tokens, 1)
    # a new part starts where the cumulative token count crosses a multiple of part_tokens
    starts = np.flatnonzero(np.diff(part_of, prepend=-1))
    return [order[a:b] for a, b in zip(starts, [*starts[1:], len(order)])]


def plan_batches(indices: np.ndarray, lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Consecutive batches of a length-sorted part, each at most `batch_tokens` padded positions
    (rows x the batch's longest instance), and at least one instance."""
    batches = []
    start = 0
    while start < len(indices):
        width = int(lengths[indices[start]])  # the longest, since parts are sorted longest first
        rows = max(1, batch_tokens // max(width, 1))
        batches.append(indices[start : start + rows])
        start += rows
    return batches


def padding_fraction(batches: list[np.ndarray], lengths: np.ndarray) -> float:
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    real = sum(int(lengths[b].sum()) for b in batches)
    return 1 - real / padded if padded else 0.0
