"""The pre-registered decision rule of docs/results/repro_v2.md, as scripts/repro_v2.py computes it, and the
results documents' tables regenerated through `miniplm.evaluation.results`."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("repro_v2", ROOT / "scripts" / "repro_v2.py")
repro_v2 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(repro_v2)


def student(loss: float, seed: int, noise: np.random.Generator, n: int = 200) -> dict:
    """A finished student whose per-instance losses average `loss` nats/token on every split."""
    tokens = np.full(n, 100)
    nats = (loss + noise.normal(0, 0.3, n)) * tokens
    splits = {s: {"per_instance": {"nats": nats.tolist(), "tokens": tokens.tolist(), "bytes": (tokens * 4).tolist()},
                  "loss_per_token": float(nats.sum() / tokens.sum()), "bits_per_byte": 0.0,
                  "loss_per_token_ci95": [0.0, 0.0]}
              for s in repro_v2.SPLITS}
    return {"name": f"x-s{seed}", "spec": {}, "manifest": {"model": {"parameters": 10**6}, "tokens": n * 100},
            "splits": splits}


def arms_with(gains: list[float], rivals: float = 0.05) -> dict:
    """random-wd at 5.0 nats/token; miniplm-wd better by gains[i] in seed i (the same instance noise)."""
    arms: dict = {"random-wd": {}, "miniplm-wd": {}, "teacher-ppl-wd": {}, "ref-ppl-wd": {}}
    for seed, gain in zip(repro_v2.SEEDS, gains):
        arms["random-wd"][seed] = student(5.0, seed, np.random.default_rng(seed))
        arms["miniplm-wd"][seed] = student(5.0 - gain, seed, np.random.default_rng(seed))
    for rival in ("teacher-ppl-wd", "ref-ppl-wd"):
        arms[rival][10] = student(5.0 - gains[0] + rivals, 10, np.random.default_rng(10))
    return arms


@pytest.mark.parametrize("gains, rivals, outcome", [
    ([0.05, 0.04, 0.06], 0.05, "works"),
    ([0.05, 0.04, 0.06], -0.01, "inconclusive"),  # a perplexity selection beats it
    ([0.05, 0.025, 0.06], 0.05, "inconclusive"),  # one seed pair under 0.03
    ([0.01, 0.02, 0.0], 0.05, "does not work"),  # mean under 0.02
    ([-0.05, -0.04, -0.06], 0.05, "does not work"),
])
def test_the_decision_follows_the_registered_thresholds(gains, rivals, outcome):
    arms = arms_with(gains, rivals)
    decided, why = repro_v2.decide(arms, "random-wd", "miniplm-wd", ("teacher-ppl-wd", "ref-ppl-wd"))
    assert decided == outcome, why
    for gain in gains:
        assert f"{gain:+.4f}" in why  # each seed pair's paired difference, control minus arm


def test_the_decision_waits_for_every_seed_pair():
    arms = arms_with([0.05, 0.04, 0.06])
    del arms["miniplm-wd"][12]
    assert repro_v2.decide(arms, "random-wd", "miniplm-wd")[0] == "pending"


def test_the_committed_tables_regenerate_from_the_committed_results(tmp_path):
    document = ROOT / "docs" / "results" / "repro_v2.md"
    copy = tmp_path / "repro_v2.md"
    copy.write_text(document.read_text())
    subprocess.run([sys.executable, str(ROOT / "scripts" / "repro_v2.py"), str(ROOT / "results" / "repro_v2"),
                    str(copy)], check=True, capture_output=True)
    assert copy.read_text() == document.read_text()


@pytest.mark.parametrize("no_kd, outcome", [(5.5, "does not work"), (6.5, "inconclusive: setting not reached")])
def test_no_verdict_on_the_differences_below_the_registered_tier(no_kd, outcome, tmp_path, monkeypatch):
    """The rule's outcome stands only if no-kd ends >= 1.0 nat/token below the unigram level (here 7.0)."""
    arms = arms_with([-0.05, -0.04, -0.06])
    arms["no-kd"] = {seed: student(no_kd, seed, np.random.default_rng(seed)) for seed in repro_v2.SEEDS}
    points = {"heldout": {"unigram [bpe8k]": {"loss_per_token": 7.0, "bits_per_byte": 2.5},
                          "bigram [bpe8k]": {"loss_per_token": 5.0, "bits_per_byte": 1.8}}}
    reached, text = repro_v2.tier(arms, points)
    assert reached == ("CPU" if no_kd == 5.5 else "none"), text
    assert repro_v2.tier(arms, {})[0] == "pending"
    monkeypatch.setattr(repro_v2, "load", lambda results: arms)
    (tmp_path / "reference_points.json").write_text(json.dumps({"levels": points}))
    rendered = repro_v2.render(tmp_path)
    assert f"- **primary** (miniplm-wd against random-wd): **{outcome}**" in rendered


def test_v2_through_compare_gives_the_papers_paired_differences_and_verdicts():
    """`miniplm compare`'s statistics on v2's committed students: the same per-seed differences as the
    document's paired-differences table, and, under issue 27's rule, the verdicts v2 registered."""
    view = repro_v2.compare_view(ROOT / "results" / "repro_v2")
    document = (ROOT / "docs" / "results" / "repro_v2.md").read_text()
    for control, arm in (("random-wd", "miniplm-wd"), ("random-mix", "miniplm")):
        seeds = [re.search(rf"^\| {control} \| {arm} \| {seed} \| ([+-]\d\.\d{{4}}) ", document, re.M)[1]
                 for seed in repro_v2.SEEDS]
        row = next(line for line in view.splitlines() if line.startswith("| ") and f"| {arm} | {control} |" in line)
        assert ", ".join(f"{seed}: {d}" for seed, d in zip(repro_v2.SEEDS, seeds)) in row
        assert "**does not work**" in row
    assert view.count("| **pending** |") == 3  # the one-seed arms


def test_the_first_reproductions_tables_regenerate_from_its_committed_results(tmp_path):
    document = ROOT / "docs" / "results" / "micro_repro.md"
    copy = tmp_path / "micro_repro.md"
    copy.write_text(document.read_text())
    subprocess.run([sys.executable, str(ROOT / "scripts" / "repro_tables.py"), "render",
                    str(ROOT / "results" / "micro_repro"), str(copy)], check=True, capture_output=True)
    assert copy.read_text() == document.read_text()
