"""The statistics that decide whether a signal beats its control (miniplm.evaluation.comparison)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from miniplm.evaluation.comparison import (
    Rule,
    compare,
    decide,
    rank_agreement,
    seed_instance_bootstrap,
    t_interval,
)


def record(nats_per_token, tokens=None) -> dict:
    nats_per_token = np.asarray(nats_per_token, dtype=np.float64)
    tokens = np.full(len(nats_per_token), 10) if tokens is None else np.asarray(tokens)
    return {"nats": (nats_per_token * tokens).tolist(), "tokens": tokens.tolist(), "bytes": (tokens * 4).tolist()}


@pytest.mark.parametrize("values", [[0.1, 0.3], [0.05, 0.02, 0.08], [1.0, -2.0, 0.5, 0.25, 3.0]])
@pytest.mark.parametrize("confidence", [0.9, 0.95])
def test_t_interval_is_scipys(values, confidence):
    expected = stats.t.interval(confidence, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert t_interval(values, confidence) == pytest.approx(expected, rel=1e-12)
    assert all(math.isnan(v) for v in t_interval([0.5]))


def test_bootstrap_over_seeds_and_instances_against_a_hand_computation():
    # each seed's instances all differ by the same amount, so only the seed draws matter: the mean of two
    # draws from {0, 1} is 0 (p 1/4), 0.5 (p 1/2) or 1 (p 1/4), and its 2.5%/97.5% percentiles are 0 and 1
    pairs = [(record([5.0] * 4), record([5.0] * 4)), (record([5.0] * 4), record([4.0] * 4))]
    assert seed_instance_bootstrap(pairs) == (0.0, 1.0)
    # one seed, two instances of 10 tokens with differences 0 and 1 nats/token: instance draws give 0, 0.5 or 1
    # with the same probabilities; unequal tokens weight the draws as the per-token mean does
    pairs = [(record([5.0, 6.0]), record([5.0, 5.0]))]
    assert seed_instance_bootstrap(pairs) == (0.0, 1.0)
    # and by hand, with the same generator: draw the seeds, then each drawn seed's instances
    pairs = [(record([5.0, 6.0, 4.0], [10, 20, 5]), record([5.5, 5.0, 4.5], [10, 20, 5])),
             (record([5.0, 5.0, 5.0]), record([4.0, 5.0, 6.5]))]
    rng, means = np.random.default_rng(0), []
    for _ in range(1000):
        total = 0.0
        for s in rng.integers(0, 2, size=2):
            control, arm = pairs[s]
            index = rng.integers(0, 3, size=3)
            total += (sum(control["nats"][i] for i in index) / sum(control["tokens"][i] for i in index)
                      - sum(arm["nats"][i] for i in index) / sum(arm["tokens"][i] for i in index))
        means.append(total / 2)
    assert seed_instance_bootstrap(pairs) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])), rel=1e-12)


def arm(losses_by_seed: dict[int, float], noise_seed: int = 0, splits=("heldout", "heldout_hq")) -> dict:
    """Students whose per-instance losses average the given nats/token on every split (shared instance noise)."""
    noise = np.random.default_rng(noise_seed).normal(0, 0.3, 200)
    return {seed: {split: record(loss + noise) for split in splits} for seed, loss in losses_by_seed.items()}


CONTROL = {10: 5.0, 11: 5.1, 12: 4.9}


@pytest.mark.parametrize("gains, outcome", [
    ([0.05, 0.04, 0.06], "works"),
    ([0.05, 0.025, 0.06], "inconclusive"),  # one seed pair under 0.03
    ([0.10, 0.031, -0.05], "inconclusive"),  # mean +0.027 is not under 0.02, but one seed pair lost
    ([0.01, 0.02, 0.0], "does not work"),  # mean under 0.02
    ([-0.05, -0.04, -0.06], "does not work"),
])
def test_the_rule_gives_its_three_outcomes(gains, outcome):
    arm_losses = {seed: loss - gain for (seed, loss), gain in zip(CONTROL.items(), gains)}
    comparison = compare(arm(CONTROL), arm(arm_losses), "random-wd", "signal")
    decided, figures = decide(comparison)
    assert decided == outcome, figures
    assert figures["per_seed"] == pytest.approx(gains, abs=1e-9)
    assert set(comparison.splits()) == {"heldout", "heldout_hq"}


def test_the_seed_interval_and_the_other_splits_are_clauses_of_works():
    # every seed pair gains >= 0.03 but one by much more: the t-interval (2 df) reaches below zero
    spread = {10: 4.96, 11: 5.06, 12: 4.0}
    decided, figures = decide(compare(arm(CONTROL), arm(spread)))
    assert decided == "inconclusive" and figures["clauses"] == {"every seed pair": True,
                                                                "interval above zero": False,
                                                                "heldout_hq not worse": True}
    assert decide(compare(arm(CONTROL), arm(spread)), Rule(interval="none"))[0] == "works"
    # better on the deciding split, worse by 0.05 on another
    control = arm(CONTROL)
    better = arm({s: v - 0.05 for s, v in CONTROL.items()})
    for seed in better:
        better[seed]["heldout_hq"] = record(np.asarray(control[seed]["heldout_hq"]["nats"]) / 10 + 0.05)
    decided, figures = decide(compare(control, better))
    assert decided == "inconclusive" and not figures["clauses"]["heldout_hq not worse"]


def test_fewer_seed_pairs_than_the_rule_needs_is_pending():
    partial = arm({10: 4.9, 11: 4.99})
    assert decide(compare(arm(CONTROL), partial))[0] == "pending"
    assert decide(compare(arm(CONTROL), partial), Rule(seeds=2))[0] == "works"


def test_summary_reports_both_intervals_in_both_units():
    comparison = compare(arm(CONTROL), arm({10: 4.95, 11: 5.03, 12: 4.86}))  # gains 0.05, 0.07, 0.04
    for unit in ("loss_per_token", "bits_per_byte"):
        summary = comparison.summary("heldout", unit)
        scale = 1 if unit == "loss_per_token" else 1 / (4 * math.log(2))  # 4 bytes per token in `record`
        assert summary["mean"] == pytest.approx(np.mean([0.05, 0.07, 0.04]) * scale, rel=1e-9)
        assert summary["seeds"] == 3
        assert summary["t_interval"][0] < summary["mean"] < summary["t_interval"][1]
        assert summary["bootstrap"][0] < summary["mean"] < summary["bootstrap"][1]


def test_rank_agreement_is_kendalls_tau():
    assert rank_agreement(["a", "b", "c", "d"], ["a", "b", "c", "d"]) == 1.0
    assert rank_agreement(["a", "b", "c", "d"], ["d", "c", "b", "a"]) == -1.0
    assert rank_agreement(["a", "b", "c"], ["b", "a", "c"]) == pytest.approx(1 / 3)
    assert rank_agreement(["a", "b", "x"], ["b", "a", "y"]) == -1.0  # over the signals both rank
    assert math.isnan(rank_agreement(["a"], ["a"]))
