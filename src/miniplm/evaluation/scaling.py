"""Scaling-law fits L(C) = A * C^-alpha + L_inf and the compute-saving factor between two runs.

The fit is least squares on the loss itself (scipy's bounded trust-region), started from the best of a grid
over L_inf where, for a fixed L_inf, log(L - L_inf) is linear in log C; compute is rescaled by its largest
value so that A stays in a well-conditioned range. The compute-saving factor of run B over run A is
C_A(L*) / C_B(L*) at A's final loss L*, both read off the fitted curves (the paper's 2.2x). `measured_saving`
reads the same ratio off the measured points instead (interpolated between them, never extrapolated).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares


@dataclass(frozen=True)
class ScalingFit:
    A: float
    alpha: float
    L_inf: float
    points: int
    rmse: float
    residuals: tuple[float, ...]

    def loss_at(self, compute):
        return self.A * np.power(np.asarray(compute, dtype=np.float64), -self.alpha) + self.L_inf

    def compute_for(self, loss: float) -> float:
        """The compute at which the fitted curve reaches `loss` (inf if it never does)."""
        if loss <= self.L_inf:
            return math.inf
        return (self.A / (loss - self.L_inf)) ** (1.0 / self.alpha)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def fit_scaling_law(compute, loss) -> ScalingFit:
    """Fit L(C) = A * C^-alpha + L_inf to points (C > 0); needs at least 3 points."""
    c = np.asarray(compute, dtype=np.float64)
    y = np.asarray(loss, dtype=np.float64)
    keep = np.isfinite(c) & np.isfinite(y) & (c > 0)
    c, y = c[keep], y[keep]
    if len(c) < 3:
        raise ValueError(f"a scaling fit needs at least 3 (compute, loss) points with compute > 0, got {len(c)}")
    scale = c.max()
    x = np.log(c / scale)

    def start(l_inf: float) -> tuple[float, float, float]:
        slope, intercept = np.polyfit(x, np.log(y - l_inf), 1)
        guess = (math.exp(intercept), max(-slope, 1e-3), l_inf)
        return guess, float(np.sum((guess[0] * np.exp(-guess[1] * x) + l_inf - y) ** 2))

    grid = [y.min() * f for f in np.linspace(0.0, 0.995, 60)]
    guess = min((start(level) for level in grid), key=lambda g: g[1])[0]

    def residual(p):
        return p[0] * np.exp(-p[1] * x) + p[2] - y

    result = least_squares(residual, guess, bounds=([1e-12, 1e-6, 0.0], [np.inf, 10.0, y.min()]), x_scale="jac")
    a, alpha, l_inf = result.x
    residuals = residual(result.x)
    return ScalingFit(A=float(a * scale**alpha), alpha=float(alpha), L_inf=float(l_inf), points=len(c),
                      rmse=float(np.sqrt(np.mean(residuals**2))), residuals=tuple(float(r) for r in residuals))


def compute_saving(baseline: ScalingFit, other: ScalingFit, target_loss: float) -> float:
    """How many times less compute `other` needs than `baseline` to reach `target_loss` (inf: only other
    reaches it; 0: only the baseline does; nan: neither)."""
    need_base, need_other = baseline.compute_for(target_loss), other.compute_for(target_loss)
    if math.isinf(need_base) and math.isinf(need_other):
        return math.nan
    return need_base / need_other


def measured_saving(baseline: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray]) -> float:
    """The compute saving read off two measured (FLOPs, loss) curves at the loss both reach: the worse run's
    final loss, located on the better run's curve by linear interpolation in log FLOPs between the two points
    that bracket it. nan where no measured pair brackets it (the better run starts below it); below 1 where
    `other` is the worse run."""
    (base_flops, base_loss), (other_flops, other_loss) = baseline, other
    if other_loss[-1] <= base_loss[-1]:  # other reaches the baseline's final loss: at what compute?
        reached = _compute_at(other_flops, other_loss, base_loss[-1])
        return float(base_flops[-1] / reached)
    return float(_compute_at(base_flops, base_loss, other_loss[-1]) / other_flops[-1])


def _compute_at(flops: np.ndarray, loss: np.ndarray, target: float) -> float:
    """The compute at which a measured curve first reaches `target` (nan where no two points bracket it)."""
    for i in range(1, len(loss)):
        if loss[i - 1] > target >= loss[i]:
            t = (loss[i - 1] - target) / (loss[i - 1] - loss[i])
            return float(np.exp(np.log(flops[i - 1]) + t * (np.log(flops[i]) - np.log(flops[i - 1]))))
    return math.nan


def read_curve(run: str | Path, metric: str = "loss_per_token") -> tuple[np.ndarray, np.ndarray]:
    """(FLOPs, held-out loss) of a training run: its eval.jsonl (written with --eval-every), else the
    eval_loss.json of `miniplm eval loss` over its checkpoints."""
    rows = curve_rows(run)
    return np.array([r["flops"] for r in rows], dtype=np.float64), np.array([r.get(metric, np.nan) for r in rows])


def curve_rows(run: str | Path) -> list[dict]:
    """The held-out evaluations of a training run, in order of training FLOPs."""
    run = Path(run)
    if (run / "eval.jsonl").is_file():
        rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines() if line]
    elif (run / "eval_loss.json").is_file():
        rows = [r for r in json.loads((run / "eval_loss.json").read_text())["points"] if r.get("flops")]
    else:
        raise FileNotFoundError(f"{run} has no held-out loss curve: train with --eval-every N, or run "
                                f"`miniplm eval loss --model {run}`")
    return sorted(rows, key=lambda r: r["flops"])
