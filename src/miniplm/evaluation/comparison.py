"""Whether a selection signal beats its control: paired differences over seeds, their intervals, the rule.

For an arm (students trained on a signal's selection) and its control (students of the same recipe on a
random selection with the same domain shares), seed by seed:

    d_s = loss(control, seed s) - loss(arm, seed s)     on the same held-out instances; positive: the arm is better

in nats/token and in bits per byte (`core.metrics.paired_difference`, whose per-seed interval resamples
instances only). Across the k seeds two intervals:

    t-interval   mean(d) +- t_{k-1} * sd(d) / sqrt(k): the spread between seeds (init, data order, draws)
    bootstrap    seeds drawn with replacement, then each drawn seed's instances: seed and instance noise together

and the decision rule, whose thresholds are config (`Rule`): *works* when every seed pair gains at least
`works` on the deciding split, the seed interval lies above zero and no other split is worse by more than
`not_worse`; *does not work* when the mean gain is under `does_not_work`; *inconclusive* otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import stats

from miniplm.core.metrics import BOOTSTRAP_RESAMPLES, means, paired_difference

UNITS = ("loss_per_token", "bits_per_byte")
Outcome = Literal["works", "does not work", "inconclusive", "pending"]


@dataclass(frozen=True)
class Rule:
    """The decision rule: thresholds in nats/token on the deciding split (issue 27's by default)."""

    split: str = "heldout"
    works: float = 0.03  # every seed pair gains at least this
    does_not_work: float = 0.02  # a mean gain below this: does not work, whatever else holds
    not_worse: float = -0.02  # every other split's mean gain above this
    interval: Literal["t", "bootstrap", "none"] = "t"  # which seed interval must lie above zero ("none": no clause)
    confidence: float = 0.95
    seeds: int = 3  # pairs needed before deciding; fewer: pending


def t_interval(values, confidence: float = 0.95) -> tuple[float, float]:
    """Student's t interval of the mean of `values` (nan with fewer than two)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return math.nan, math.nan
    mean, sem = float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))
    margin = float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1)) * sem
    return mean - margin, mean + margin


def seed_instance_bootstrap(pairs: list[tuple[dict, dict]], unit: str = "loss_per_token", confidence: float = 0.95,
                            resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean paired difference over seeds, resampling the seeds (with replacement) and,
    inside each drawn seed, its instances: `pairs` holds one (control, arm) pair of `per_instance` records per
    seed. Seeded: the same inputs give the same interval."""
    rng = np.random.default_rng(seed)
    records = [[[np.asarray(r[k], dtype=np.float64) for k in ("nats", "tokens", "bytes")] for r in pair]
               for pair in pairs]
    which = UNITS.index(unit)
    differences = np.empty(resamples)
    for b in range(resamples):
        drawn = rng.integers(0, len(records), size=len(records))
        total = 0.0
        for s in drawn:
            control, arm = records[s]
            index = rng.integers(0, len(control[0]), size=len(control[0]))
            total += means(*control, index)[which] - means(*arm, index)[which]
        differences[b] = total / len(drawn)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(differences, [tail, 100 - tail])
    return float(low), float(high)


@dataclass
class Comparison:
    """An arm against its control on every split both were evaluated on, seed by seed."""

    control: str
    arm: str
    seeds: dict[int, dict[str, dict]] = field(default_factory=dict)  # seed -> split -> paired_difference
    pairs: dict[str, list[tuple[dict, dict]]] = field(default_factory=dict)  # split -> per-seed record pairs
    summaries: dict[tuple, dict] = field(default_factory=dict, repr=False)  # computed once: the bootstrap is slow

    def splits(self) -> list[str]:
        return list(dict.fromkeys(s for by_split in self.seeds.values() for s in by_split))

    def values(self, split: str, unit: str = "loss_per_token") -> list[float]:
        return [by_split[split][unit] for by_split in self.seeds.values() if split in by_split]

    def summary(self, split: str, unit: str = "loss_per_token", confidence: float = 0.95) -> dict:
        """Mean, sample std, t-interval and seed+instance bootstrap of the per-seed differences on one split."""
        if (split, unit, confidence) in self.summaries:
            return self.summaries[split, unit, confidence]
        values = self.values(split, unit)
        self.summaries[split, unit, confidence] = {"seeds": len(values), "per_seed": values,
                "mean": float(np.mean(values)) if values else math.nan,
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan,
                "t_interval": list(t_interval(values, confidence)),
                "bootstrap": list(seed_instance_bootstrap(self.pairs[split], unit, confidence))
                if self.pairs.get(split) else [math.nan, math.nan]}
        return self.summaries[split, unit, confidence]


def compare(control: dict[int, dict[str, dict]], arm: dict[int, dict[str, dict]], control_name: str = "control",
            arm_name: str = "arm") -> Comparison:
    """Paired differences of two arms over the seeds both have. Each arm: {seed: {split: per_instance record}}."""
    comparison = Comparison(control_name, arm_name)
    for seed in sorted(set(control) & set(arm)):
        shared = [s for s in control[seed] if s in arm[seed]]
        comparison.seeds[seed] = {s: paired_difference(control[seed][s], arm[seed][s]) for s in shared}
        for s in shared:
            comparison.pairs.setdefault(s, []).append((control[seed][s], arm[seed][s]))
    return comparison


def decide(comparison: Comparison, rule: Rule = Rule()) -> tuple[Outcome, dict]:
    """The rule's outcome for one comparison, and every figure it read."""
    primary = comparison.values(rule.split)
    if len(primary) < rule.seeds:
        return "pending", {"seeds": len(primary), "needed": rule.seeds}
    mean = float(np.mean(primary))
    figures: dict = {"per_seed": primary, "mean": mean}
    clauses = {"every seed pair": min(primary) >= rule.works}
    if rule.interval != "none":
        summary = comparison.summary(rule.split, confidence=rule.confidence)
        low = summary["t_interval" if rule.interval == "t" else "bootstrap"][0]
        figures["interval"] = summary["t_interval" if rule.interval == "t" else "bootstrap"]
        clauses["interval above zero"] = low > 0
    for split in comparison.splits():
        if split != rule.split:
            other = float(np.mean(comparison.values(split)))
            figures[f"mean {split}"] = other
            clauses[f"{split} not worse"] = other > rule.not_worse
    figures["clauses"] = clauses
    if mean < rule.does_not_work:
        return "does not work", figures
    return ("works" if all(clauses.values()) else "inconclusive"), figures


def rank_agreement(first: list[str], second: list[str]) -> float:
    """Kendall's tau between two rankings of the same signals (best first): 1 when the order agrees."""
    common = [name for name in first if name in second]
    if len(common) < 2:
        return math.nan
    tau = stats.kendalltau([first.index(n) for n in common], [second.index(n) for n in common]).statistic
    return float(tau)


@dataclass
class Signal:
    """One signal's students of one size: its arm and its control, each {seed: {split: per_instance record}}."""

    name: str
    control_name: str
    arm: dict[int, dict[str, dict]]
    control: dict[int, dict[str, dict]]
    cost_seconds: float | None = None  # what selecting with it cost offline (scoring, fitting), when known


def rank(signals: list[Signal], rule: Rule = Rule()) -> list[dict]:
    """Each signal against its control on every split, decided and ranked by the mean gain on the rule's split
    (best first; pending signals last)."""
    rows = []
    for signal in signals:
        comparison = compare(signal.control, signal.arm, signal.control_name, signal.name)
        outcome, figures = decide(comparison, rule)
        splits = {split: {unit: comparison.summary(split, unit, rule.confidence) for unit in UNITS}
                  for split in comparison.splits()}
        rows.append({"signal": signal.name, "control": signal.control_name, "outcome": outcome,
                     "clauses": figures.get("clauses", {}), "seeds": sorted(comparison.seeds),
                     "cost_seconds": signal.cost_seconds, "splits": splits})
    def order(row: dict) -> tuple[bool, float]:
        mean = row["splits"].get(rule.split, {}).get("loss_per_token", {}).get("mean", math.nan)
        return row["outcome"] == "pending", -mean if math.isfinite(mean) else math.inf

    return sorted(rows, key=order)


def jsonable(value):
    """`value` with every nan as None, for strict JSON readers."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _cell(summary: dict, which: str) -> str:
    low, high = summary[which]
    interval = f"[{low:+.4f}, {high:+.4f}]" if np.isfinite(low) else "n/a"
    return f"{summary['mean']:+.4f} {interval}"


def render_report(ranked: dict[str, list[dict]], rule: Rule, title: str, figure: str | None) -> str:
    """report.md: per size the ranked table (paired difference control - signal, mean over seeds with the
    t-interval and the seed+instance bootstrap), each split in both units, the verdicts and the sizes' agreement."""
    lines = [f"# {title}", "",
             f"d = loss(control) - loss(signal) on the same held-out instances, per seed; positive: the signal's "
             f"students are better. Mean over seeds [{rule.confidence:.0%} t-interval over seeds] and "
             f"[{rule.confidence:.0%} bootstrap over seeds and instances together].", "",
             f"Rule (split `{rule.split}`, nats/token): **works** if every seed pair gains >= {rule.works}"
             + (f", the {'t-interval' if rule.interval == 't' else 'bootstrap'} lies above 0"
                if rule.interval != "none" else "")
             + f" and no other split's mean gain is below {rule.not_worse}; **does not work** if the mean gain is "
             f"under {rule.does_not_work}; **inconclusive** otherwise (more seeds, larger students or a GPU "
             f"narrow it); **pending** until {rule.seeds} seed pairs have finished.", ""]
    for size, rows in ranked.items():
        splits = list(dict.fromkeys(s for r in rows for s in r["splits"]))
        lines += [f"## {size}", "", f"| rank | signal | control | verdict | d per seed on {rule.split} | "
                  "offline cost | " + " | ".join(f"{s} nats/token: t / bootstrap" for s in splits) + " | "
                  + " | ".join(f"{s} bits/byte (t)" for s in splits) + " |",
                  "|---" * (6 + 2 * len(splits)) + "|"]
        for i, r in enumerate(rows, 1):
            cost = "-" if r["cost_seconds"] is None else f"{r['cost_seconds']:,.0f} s"
            nats = [f"{_cell(r['splits'][s]['loss_per_token'], 't_interval')} / "
                    f"{_cell(r['splits'][s]['loss_per_token'], 'bootstrap').split(' ', 1)[1]}"
                    if s in r["splits"] else "-" for s in splits]
            bits = [_cell(r["splits"][s]["bits_per_byte"], "t_interval") if s in r["splits"] else "-" for s in splits]
            primary = r["splits"].get(rule.split, {}).get("loss_per_token", {}).get("per_seed", [])
            per_seed = ", ".join(f"{seed}: {d:+.4f}" for seed, d in zip(r["seeds"], primary)) or "-"
            lines.append(f"| {i} | {r['signal']} | {r['control']} | **{r['outcome']}** | {per_seed} | {cost} | "
                         + " | ".join(nats + bits) + " |")
        lines.append("")
    if len(ranked) == 2:
        (a, first), (b, second) = ranked.items()
        tau = rank_agreement([r["signal"] for r in first], [r["signal"] for r in second])
        lines += [f"Rank agreement between {a} and {b} (Kendall's tau): {tau:+.2f} (1: the same order; the "
                  f"decision is stable across sizes only when it is near 1).", ""]
    if figure:
        lines += [f"![paired differences with their intervals]({figure})", ""]
    return "\n".join(lines)


def forest_plot(ranked: dict[str, list[dict]], rule: Rule, path) -> None:
    """Each signal's mean gain on the rule's split with its t-interval and bootstrap, one panel per size."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no window

    fig = Figure(figsize=(7, 1 + 0.5 * max(len(rows) for rows in ranked.values()) * len(ranked)))
    axes = fig.subplots(len(ranked), 1, squeeze=False)[:, 0]
    for ax, (size, rows) in zip(axes, ranked.items()):
        shown = [r for r in rows if rule.split in r["splits"]]
        for y, r in enumerate(reversed(shown)):
            s = r["splits"][rule.split]["loss_per_token"]
            for which, offset, color in (("t_interval", 0.12, "#1f77b4"), ("bootstrap", -0.12, "#ff7f0e")):
                low, high = s[which]
                if np.isfinite(low):
                    ax.plot([low, high], [y + offset] * 2, color=color, lw=2,
                            label=which.replace("_", "-") if y == 0 else None)
            ax.plot([s["mean"]], [y], "ko")
        ax.axvline(0, color="grey", lw=1)
        ax.axvline(rule.works, color="green", lw=1, ls="--")
        ax.set_yticks(range(len(shown)), [r["signal"] for r in reversed(shown)])
        ax.set_title(f"{size}: control - signal on {rule.split} (nats/token)", fontsize=9)
        if shown:
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
