"""Held-out loss summaries every model gets alike: nats per token, bits per byte, a bootstrap interval.

Bits per byte = (sum of the losses of the scored positions, in nats) / ln 2 / (the UTF-8 bytes those
positions' target tokens stand for, EOS counting one byte). Unlike nats/token it does not depend on how a
tokenizer cuts the text, so students of different tokenizers compare on the same text.
"""

from __future__ import annotations

import math

import numpy as np

from miniplm.core.tokens import scored_targets

BOOTSTRAP_RESAMPLES = 1000


def loss_summary(nats: np.ndarray, counts: np.ndarray, nbytes: np.ndarray, seed: int = 0) -> dict:
    """Per-instance summed losses (nats), scored positions and scored bytes -> the means and their 95%
    bootstrap intervals (instances resampled with replacement, seeded: the same inputs give the same interval)."""
    nats, counts, nbytes = (np.asarray(a, dtype=np.float64) for a in (nats, counts, nbytes))
    scored = counts > 0
    summary = {"loss_per_token": float(nats.sum() / max(counts.sum(), 1)),
               "loss_per_instance": float(np.mean(nats[scored] / counts[scored])) if scored.any() else math.nan,
               "bits_per_byte": float(nats.sum() / math.log(2) / nbytes.sum()) if nbytes.sum() else math.nan,
               "instances": int(len(nats)), "tokens": int(counts.sum()), "bytes": int(nbytes.sum())}
    if len(nats) > 1:
        per_token, per_byte = means(nats, counts, nbytes, _draws(len(nats), seed))
        summary["loss_per_token_ci95"] = [float(v) for v in np.percentile(per_token, [2.5, 97.5])]
        summary["bits_per_byte_ci95"] = [float(v) for v in np.percentile(per_byte, [2.5, 97.5])]
    return summary


def paired_difference(mine: dict, theirs: dict, seed: int = 0) -> dict:
    """Difference (mine - theirs) of two models' mean losses on the same instances, nats/token and bits/byte,
    with 95% bootstrap intervals that resample the instances jointly: much narrower than either model's own
    interval, since both models find the same instances hard. Arguments: `per_instance` records."""
    arrays = [{k: np.asarray(r[k], dtype=np.float64) for k in ("nats", "tokens", "bytes")} for r in (mine, theirs)]
    n = len(arrays[0]["nats"])
    if any(len(a["nats"]) != n for a in arrays):
        raise ValueError("paired_difference: the two records cover different numbers of instances")

    def difference(index) -> tuple[np.ndarray, np.ndarray]:
        (token_a, byte_a), (token_b, byte_b) = (means(a["nats"], a["tokens"], a["bytes"], index) for a in arrays)
        return token_a - token_b, byte_a - byte_b

    token, byte = difference(np.arange(n))
    token_draws, byte_draws = difference(_draws(n, seed))
    return {"loss_per_token": float(token), "loss_per_token_ci95": np.percentile(token_draws, [2.5, 97.5]).tolist(),
            "bits_per_byte": float(byte), "bits_per_byte_ci95": np.percentile(byte_draws, [2.5, 97.5]).tolist(),
            "instances": n}


def _draws(n: int, seed: int) -> np.ndarray:
    """BOOTSTRAP_RESAMPLES rows of n instance indices drawn with replacement, seeded."""
    return np.random.default_rng(seed).integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))


def means(nats: np.ndarray, counts: np.ndarray, nbytes: np.ndarray, index: np.ndarray):
    """(nats/token, bits/byte) of the instances `index` selects (the last axis: one mean per row of draws)."""
    total = nats[index].sum(-1)
    return total / np.maximum(counts[index].sum(-1), 1), total / math.log(2) / np.maximum(nbytes[index].sum(-1), 1)


def half_width(summary: dict, key: str = "loss_per_token") -> float:
    """Half the width of a summary's 95% interval (nan without one)."""
    low, high = summary.get(f"{key}_ci95", (math.nan, math.nan))
    return (high - low) / 2


def scored_bytes(instances, masked: np.ndarray, byte_lengths: np.ndarray) -> np.ndarray:
    """Per instance, the UTF-8 bytes its scored positions' targets stand for (`core.tokens.token_byte_lengths`)."""
    return np.array([byte_lengths[scored_targets(x, masked)[1]].sum() for x in instances], dtype=np.int64)
