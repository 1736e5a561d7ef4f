"""`miniplm compare`: a `compare:` section expands into signals, controls and students, and its report ranks
every signal against its control."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml

from conftest import run_yaml
from miniplm.cli import main
from miniplm.core.config import ConfigError, load_config
from miniplm.pipeline import RunConfig, expand_compare

SIGNALS = {"miniplm-wd": {"alpha": 0.5, "domain_quota": "proportional", "progress": False},
           "miniplm": {"alpha": 0.5, "progress": False},
           "teacher-ppl-wd": {"selector": "teacher-ppl", "domain_quota": "proportional", "progress": False}}


def toy(tmp_path, tokenizer_dir, **compare) -> dict:
    """conftest's tiny run with a compare section in place of its selections and students."""
    config = run_yaml(tmp_path, tokenizer_dir)
    for key in ("selections", "students", "proxy", "tokenizers"):
        del config[key]
    config["eval"] = {"max_instances": 8, "points": 2, "tasks": [], "teacher_loss": False}
    config["compare"] = {"signals": SIGNALS, "seeds": [10, 11], "student": {"model": "llama-tiny"},
                         "splits": ["heldout", "heldout_hq"], "tokens": 1500, **compare}
    return config


def test_the_expansion_pairs_each_signal_with_a_control_of_its_quotas(tmp_path, tokenizer_dir):
    config = load_config(RunConfig, None, toy(tmp_path, tokenizer_dir, second_size={"model": "qwen2-tiny"}))
    run = expand_compare(config)
    assert expand_compare(run) == run  # expanding twice changes nothing
    s = run.selections
    assert s["random-wd"].selector == "random" and s["random-wd"].domain_quota == "proportional"  # within domain
    assert s["random-mix-miniplm"].domain_quota == "from:miniplm"  # a global cut: the signal's own mix
    assert {s[n].alpha for n in s} == {0.5}
    assert set(s) == {*SIGNALS, "random-wd", "random-mix-miniplm"}  # one within-domain control serves both
    arms = ["no-kd", "random-wd", "random-mix-miniplm", *SIGNALS]
    names = [x.name for x in run.students]
    assert names == [f"{size}{arm}-s{seed}" for size in ("", "qwen2-tiny-") for seed in (10, 11) for arm in arms]
    assert {x.data for x in run.students} == {"all", "random-wd", "random-mix-miniplm", *SIGNALS}
    seeds = {x.name: run.student_train(x).seed for x in run.students}
    assert {seeds[f"no-kd-s{seed}"] for seed in (10, 11)} == {10, 11}
    assert all(seeds[n] == int(n.rsplit("-s", 1)[1]) for n in names)
    assert {run.student_train(x).max_tokens for x in run.students} == {1500}  # one token budget for all
    assert run.eval.split == "heldout" and run.eval.final_splits == ["heldout", "heldout_hq"]


@pytest.mark.parametrize("change, message", [
    ({"signals": {}}, "compare.signals: name at least one"),
    ({"seeds": [1, 1]}, "compare.seeds: give distinct seeds"),
    ({"rule": {"split": "heldout_unseen"}}, "compare.rule.split: 'heldout_unseen' is not one of compare.splits"),
    ({"signals": {"random-x": {}}}, "compare.signals.random-x: the name is taken"),
])
def test_compare_sections_that_cannot_run_are_refused(tmp_path, tokenizer_dir, change, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RunConfig, None, toy(tmp_path, tokenizer_dir, **change))


def test_print_config_shows_the_expansion(tmp_path, tokenizer_dir, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(toy(tmp_path, tokenizer_dir)))
    assert main(["compare", str(path), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "random-wd" in printed["selections"] and len(printed["students"]) == 2 * 6


@pytest.mark.slow
def test_a_tiny_compare_end_to_end_reports_every_signal(tmp_path, tokenizer_dir, capsys, monkeypatch):
    monkeypatch.setenv("MINIPLM_CACHE", str(tmp_path / "cache"))
    config = toy(tmp_path, tokenizer_dir, signals={k: SIGNALS[k] for k in ("miniplm-wd", "miniplm")},
                 rule={"seeds": 2})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["compare", str(path)]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "run"
    manifests = {d.name: json.loads((d / "manifest.json").read_text()) for d in (out / "students").iterdir()}
    assert len(manifests) == 5 * 2  # no-kd, random-wd, random-mix-miniplm, miniplm-wd, miniplm; 2 seeds each
    assert len({m["steps"] for m in manifests.values()}) == 1  # the same optimizer steps for every arm
    result = json.loads((out / "compare" / "compare.json").read_text())
    rows = result["sizes"]["llama-tiny"]
    assert {r["signal"] for r in rows} == {"miniplm-wd", "miniplm"}
    assert {r["control"] for r in rows} == {"random-wd", "random-mix-miniplm"}
    for r in rows:
        assert r["outcome"] in ("works", "does not work", "inconclusive") and r["seeds"] == [10, 11]
        assert set(r["splits"]) == {"heldout", "heldout_hq"} and r["cost_seconds"] > 0
        per_token = r["splits"]["heldout"]["loss_per_token"]
        assert len(per_token["per_seed"]) == 2 and per_token["t_interval"][0] <= per_token["mean"]
    report = (out / "compare" / "report.md").read_text()
    assert "| 1 |" in report and "| 2 |" in report and (out / "compare" / "forest.png").stat().st_size > 0
    for arm in ("no-kd", "random-wd", "random-mix-miniplm", "miniplm-wd", "miniplm"):  # the students table
        final = [json.loads((out / "students" / f"{arm}-s{seed}" / "evaluation" / "eval_splits.json").read_text())
                 ["splits"]["heldout"]["loss_per_token"] for seed in (10, 11)]
        assert re.search(rf"^\| {arm} \| llama-tiny \| .* \| 10,11 \| .* \| {np.mean(final):.4f} ± ", report, re.M)
    for control, arm in (("random-wd", "miniplm-wd"), ("random-mix-miniplm", "miniplm")):  # by domain
        assert re.search(rf"^\| {control} \| {arm} \| -?\d", report, re.M)
    assert "compare (llama-tiny):" in printed
    # a rerun finds every stage cached and writes the same numbers
    assert main(["compare", str(path)]) == 0
    assert "done in" not in capsys.readouterr().out.split("report ...")[0]
    assert json.loads((out / "compare" / "compare.json").read_text()) == result


def test_plan_shows_the_grid_and_an_estimate_from_measured_speeds_without_running(tmp_path, tokenizer_dir, capsys,
                                                                                   monkeypatch):
    import miniplm.plan

    monkeypatch.setattr(miniplm.plan, "PROBE_SECONDS", 0.05)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(toy(tmp_path, tokenizer_dir)))
    assert main(["compare", str(path), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "grid: 3 signals (miniplm, miniplm-wd, teacher-ppl-wd) + controls (random-mix-miniplm, random-wd)" in out
    assert "x 2 seeds x 1 size(s) (llama-tiny) = 12 students" in out
    assert "pool 5,200 (scored by the teacher and the reference), 1,500 per student" in out  # 80 x (64 + 1)
    assert "measured on this machine (tokens/s): train llama-tiny" in out and "score teacher" in out
    assert "students llama-tiny (12 x 1,500 tokens):" in out and "estimated:" in out
    assert not (tmp_path / "run").exists()  # nothing was prepared, scored or trained
    result = miniplm.plan.plan(load_config(RunConfig, None, toy(tmp_path, tokenizer_dir)), 0.05, log=lambda m: None)
    assert all(v > 0 for v in result["speeds"].values()) and result["total_seconds"] >= 0
    assert result["seconds"]["students llama-tiny (12 x 1,500 tokens)"] == pytest.approx(
        12 * 1500 / result["speeds"]["train llama-tiny"], abs=1)
