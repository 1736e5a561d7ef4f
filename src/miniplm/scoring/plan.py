"""The work plan of a scoring run: instances sorted by length, cut into parts, each part into batches.

The plan depends only on the instance lengths and `part_tokens`, never on the number of workers, so one
process, torchrun ranks and Ray actors score exactly the same parts, and a resumed run skips the parts
already on disk. Batches are formed inside a part by a token budget, so changing `batch_tokens` (or the
out-of-memory fallback halving a batch) leaves the plan and the resume state valid.

A batch holds instances of one padded width only (`padded_width`: a function of the instance's own length),
so an instance is computed at the same shape whatever the batch size, the part or the other rows. Kernels
pick their blocking (and so their summation order) by shape; in bf16 a 30-layer teacher's score of one
instance moved by up to 2.7e-3 nats/token between two batch widths (bench/invariance.py), while at one
width it is bit-identical for any number of rows on a CPU.
"""

from __future__ import annotations

import numpy as np

WIDTH_MULTIPLE = 16  # 0.6% padding on the default corpus (1,024-token instances); 64 would be 1.3%


def padded_width(n_tokens):
    """Input positions (n_tokens - 1, the last token is only a target) rounded up to a multiple of
    WIDTH_MULTIPLE; works on an int or an array of lengths."""
    return np.maximum(-(-(np.asarray(n_tokens) - 1) // WIDTH_MULTIPLE), 1) * WIDTH_MULTIPLE


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
    """Consecutive batches of a length-sorted part (longest first), each of one padded width, at most
    `batch_tokens` padded positions (rows x width) and at least one instance."""
    widths = padded_width(np.asarray(lengths)[indices])
    # widths do not increase along the part: where each width's run of instances ends
    run_ends = np.searchsorted(-widths, -widths, side="right")
    batches = []
    start = 0
    while start < len(indices):
        rows = max(1, batch_tokens // int(widths[start]))
        end = min(start + rows, int(run_ends[start]))
        batches.append(indices[start:end])
        start = end
    return batches


def padding_fraction(batches: list[np.ndarray], lengths: np.ndarray) -> float:
    """The share of the batches' input positions that are padding."""
    lengths = np.asarray(lengths)
    padded = sum(len(b) * int(padded_width(lengths[b].max())) for b in batches)
    real = sum(int(lengths[b].sum()) - len(b) for b in batches)
    return 1 - real / padded if padded else 0.0
