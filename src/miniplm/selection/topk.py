"""Exact top-k (or top-by-token-budget) over a stream of scores, in bounded memory.

The ranking is by key descending, ties broken by instance id ascending, so the selection is a
deterministic function of the scores. Keys (float64) map to order-preserving uint64s; together with the
reversed id they form a 128-bit composite that is selected radix-style: each pass over the stream
histograms the next 16 bits of the rows still in the boundary bucket, until the bucket is small enough to
finish in memory with one sort. Typical data needs two passes; heavy ties cost a few more. Memory is one
65,536-bucket histogram plus at most `max_candidates` rows, whatever the stream length.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

# A stream is a callable that yields chunks (instance_ids int64, keys float64, weights int64) afresh each call.
Stream = Callable[[], Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]]

DIGIT_BITS = 16
ID_LIMIT = np.uint64(2**63 - 1)


def sortable(keys: np.ndarray) -> np.ndarray:
    """float64 -> uint64 with the same order (-inf < ... < 0.0 < ... < inf). NaN must be removed."""
    bits = (np.asarray(keys, dtype=np.float64) + 0.0).view(np.uint64)  # + 0.0 turns -0.0 into 0.0: they tie
    negative = (bits >> np.uint64(63)).astype(bool)
    return np.where(negative, ~bits, bits | np.uint64(1 << 63))


def _digit(ukey: np.ndarray, rid: np.ndarray, level: int) -> np.ndarray:
    """The level-th 16-bit digit (0 = most significant) of the composite (ukey, reversed id)."""
    word = ukey if level < 4 else rid
    shift = np.uint64(DIGIT_BITS * (3 - level % 4))
    return ((word >> shift) & np.uint64(0xFFFF)).astype(np.int64)


def _prefix_mask(ukey: np.ndarray, rid: np.ndarray, prefix: list[int]) -> np.ndarray:
    mask = np.ones(len(ukey), dtype=bool)
    for level, value in enumerate(prefix):
        mask &= _digit(ukey, rid, level) == value
    return mask


@dataclass(frozen=True)
class Cut:
    """Rows ranked at or above (ukey, rid) are selected; `selected_weight` is what they add up to."""

    ukey: int
    rid: int
    selected_rows: int
    selected_weight: int
    passes: int

    def selects(self, ids: np.ndarray, keys: np.ndarray) -> np.ndarray:
        ukey = sortable(keys)
        rid = ID_LIMIT - ids.astype(np.uint64)
        return (ukey > np.uint64(self.ukey)) | ((ukey == np.uint64(self.ukey)) & (rid >= np.uint64(self.rid)))


def exact_top(stream: Stream, target: int, by_weight: bool = False, max_candidates: int = 1 << 22) -> Cut | None:
    """The cut that keeps the `target` top rows (by_weight=False) or the longest prefix of the ranking
    whose weights add up to at most `target` (by_weight=True). None when nothing is kept."""
    if target <= 0:
        return None
    prefix: list[int] = []
    above_rows = above_weight = 0  # rows ranked strictly above the current bucket
    passes = 0
    while True:
        passes += 1
        hist_rows = np.zeros(1 << DIGIT_BITS, dtype=np.int64)
        hist_weight = np.zeros(1 << DIGIT_BITS, dtype=np.int64)
        for ids, keys, weights in stream():
            ukey, rid = sortable(keys), ID_LIMIT - ids.astype(np.uint64)
            mask = _prefix_mask(ukey, rid, prefix)
            digit = _digit(ukey[mask], rid[mask], len(prefix))
            hist_rows += np.bincount(digit, minlength=1 << DIGIT_BITS)
            hist_weight += np.bincount(digit, weights=weights[mask], minlength=1 << DIGIT_BITS).astype(np.int64)
        if not prefix and hist_rows.sum() == 0:
            return None
        need = target - (above_weight if by_weight else above_rows)
        counts = hist_weight if by_weight else hist_rows
        # walk buckets from the highest digit down to the one where the cumulative amount reaches `need`
        cumulative = np.cumsum(counts[::-1])
        position = int(np.searchsorted(cumulative, need, side="left"))
        if position >= len(cumulative):  # everything fits: descend into the lowest bucket to find the end
            bucket = int(np.flatnonzero(hist_rows)[0])
        else:
            bucket = (1 << DIGIT_BITS) - 1 - position
        above_rows += int(hist_rows[bucket + 1 :].sum())
        above_weight += int(hist_weight[bucket + 1 :].sum())
        prefix.append(bucket)
        if hist_rows[bucket] <= max_candidates or len(prefix) == 8:
            return _finish(stream, prefix, target, by_weight, above_rows, above_weight, passes + 1)


def _finish(stream: Stream, prefix: list[int], target: int, by_weight: bool, above_rows: int,
            above_weight: int, passes: int) -> Cut | None:
    """Collect the boundary bucket's rows and cut it exactly in memory."""
    ukeys, rids, weights = [], [], []
    for ids, keys, w in stream():
        ukey, rid = sortable(keys), ID_LIMIT - ids.astype(np.uint64)
        mask = _prefix_mask(ukey, rid, prefix)
        ukeys.append(ukey[mask])
        rids.append(rid[mask])
        weights.append(w[mask])
    ukey, rid, weight = np.concatenate(ukeys), np.concatenate(rids), np.concatenate(weights)
    order = np.lexsort((rid, ukey))[::-1]  # descending by (ukey, rid)
    ukey, rid, weight = ukey[order], rid[order], weight[order]
    if by_weight:
        room = target - above_weight
        cumulative = np.cumsum(weight)
        take = int(np.searchsorted(cumulative, room, side="right"))  # longest prefix with sum <= room
    else:
        take = min(target - above_rows, len(ukey))
    if take <= 0:
        if above_rows == 0:
            return None
        # the cut falls exactly at the bucket's upper edge: nothing of it is kept
        return _cut_above_bucket(stream, prefix, above_rows, above_weight, passes)
    return Cut(int(ukey[take - 1]), int(rid[take - 1]), above_rows + take,
               above_weight + int(weight[:take].sum()), passes)


def _cut_above_bucket(stream: Stream, prefix: list[int], above_rows: int, above_weight: int, passes: int) -> Cut:
    """The lowest-ranked row above the boundary bucket (one more pass)."""
    best: tuple[int, int] | None = None
    for ids, keys, _ in stream():
        ukey, rid = sortable(keys), ID_LIMIT - ids.astype(np.uint64)
        above = np.zeros(len(ukey), dtype=bool)
        equal = np.ones(len(ukey), dtype=bool)
        for level, value in enumerate(prefix):
            d = _digit(ukey, rid, level)
            above |= equal & (d > value)
            equal &= d == value
        if above.any():
            order = np.lexsort((rid[above], ukey[above]))
            low = (int(ukey[above][order[0]]), int(rid[above][order[0]]))
            best = low if best is None or low < best else best
    assert best is not None
    return Cut(best[0], best[1], above_rows, above_weight, passes + 1)
