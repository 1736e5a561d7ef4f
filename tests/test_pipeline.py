"""`miniplm run`: every stage end to end on tiny data, then a rerun that finds every stage cached."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import run_yaml
from miniplm.cli import main
from miniplm.core.config import ConfigError, load_config
from miniplm.pipeline import Pipeline, RunConfig


def test_run_end_to_end_then_everything_cached(tmp_path, tokenizer_dir, capsys, monkeypatch):
    monkeypatch.setenv("MINIPLM_CACHE", str(tmp_path / "cache"))
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(run_yaml(tmp_path, tokenizer_dir)))
    assert main(["run", str(config_file)]) == 0
    first = capsys.readouterr().out
    out = tmp_path / "run"
    assert "[ 1/" in first and "report:" in first and "compute saving" in first
    report = json.loads((out / "report" / "results.json").read_text())
    assert set(report["runs"]) == {"no-kd", "miniplm", "kd", "small-vocab"}
    # equal tokens for the uniform and the selected data (the selection is the smaller corpus) ...
    manifests = {s: json.loads((out / "students" / s / "manifest.json").read_text()) for s in report["runs"]}
    assert manifests["no-kd"]["tokens"] == pytest.approx(manifests["miniplm"]["tokens"], rel=0.1)
    # ... Vanilla KD cut to equal FLOPs, its teacher forward counted in its compute
    assert manifests["kd"]["steps"] < manifests["no-kd"]["steps"]
    assert manifests["kd"]["teacher"]["parameters"] > 0
    kd_curve = (out / "students" / "kd" / "eval.jsonl").read_text().splitlines()
    assert len(kd_curve) >= 3  # held-out points spread over its FLOP-matched steps, enough for a fit
    curve = [json.loads(x) for x in (out / "students" / "miniplm" / "eval.jsonl").read_text().splitlines()]
    assert len(curve) >= 3 and curve[-1]["step"] == manifests["miniplm"]["steps"]
    tasks = json.loads((out / "students" / "no-kd" / "evaluation" / "eval_tasks.json").read_text())["tasks"]
    assert tasks["lambada_openai"]["examples"] == 4
    differences = report["final_splits"]["heldout_hq"]["miniplm"]["difference"]  # paired, on the same instances
    assert len(differences["loss_per_token_ci95"]) == 2 and "difference" not in report["final_splits"]["heldout_hq"][
        "no-kd"]
    final = json.loads((out / "students" / "miniplm" / "evaluation" / "eval_splits.json").read_text())
    assert final["splits"]["heldout"]["loss_per_token"] > 0 and final["splits"]["heldout"]["instances"] > 0
    points = json.loads((out / "reference_points" / "reference_points.json").read_text())
    for split in ("heldout_hq", "heldout"):  # every level on every split, in nats/token and bits/byte
        levels = points["levels"][split]
        trained = " [bpe280]"  # the student tokenizer the run trained
        assert set(levels) == {"unigram", "bigram", "teacher", "reference", "unigram" + trained, "bigram" + trained}
        assert all(p["loss_per_token"] > 0 and p["bits_per_byte"] > 0 and len(p["loss_per_token_ci95"]) == 2
                   for p in levels.values())
    # the proxy's table: the teacher labelled 70% of the pool (exactly those rows exact), select read it
    proxied = json.loads((out / "scores" / "proxy" / "manifest.json").read_text())
    assert proxied["exact_rows"] == 56 and "precision" in proxied["summary"]["against_exact"]
    assert json.loads((out / "selections" / "miniplm-proxy" / "manifest.json").read_text())["kept"] == 40
    assert any(row["stage"].startswith("proxy") for row in report["costs"])
    assert points["fit_instances"] == 80  # the n-gram levels are fitted on the scored pool ...
    diagnostic = json.loads((out / "selections" / "miniplm" / "manifest.json").read_text())["ngram_diagnostic"]
    for split in ("heldout_hq", "heldout"):  # ... as the selections' diagnostics, on the same instances
        for level in ("unigram", "bigram"):
            assert diagnostic[split]["pool"][level]["loss_per_token"] == pytest.approx(
                points["levels"][split][level]["loss_per_token"], rel=1e-12)
    assert (out / "report" / "report.html").is_file() and (out / "selections" / "random-mix").is_dir()
    # nothing written outside the output directory (and the cache it was given), nothing temporary left
    inputs = {"raw", "teacher", "run.yaml", "cache", "run"}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in inputs) == []
    assert not [p for pattern in ("*.tmp", "*.partial", "*.lock") for p in tmp_path.rglob(pattern)]

    # the results document's tables regenerate from the collected small files alone
    script = Path(__file__).parents[1] / "scripts" / "repro_tables.py"
    doc = tmp_path / "doc.md"
    doc.write_text("# prose\n<!-- tables:begin -->\nstale\n<!-- tables:end -->\nmore prose\n")
    results = tmp_path / "results"
    for args in (["collect", str(out), str(results)], ["render", str(results), str(doc)]):
        subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True)
    assert not list(results.rglob("*.safetensors")) and not list(results.rglob("*.bin"))
    text = doc.read_text()
    assert text.startswith("# prose") and text.endswith("more prose\n") and "stale" not in text
    for name in ("no-kd", "miniplm", "kd"):
        final = json.loads((out / "students" / name / "eval.jsonl").read_text().splitlines()[-1])
        assert f"| {name} |" in text and f"{final['loss_per_token']:.4f}" in text
    unigram = points["levels"]["heldout_hq"]["unigram"]
    assert f"| unigram | {unigram['loss_per_token']:.4f} / {unigram['bits_per_byte']:.4f} |" in text

    manifests = {p: p.read_text() for p in out.rglob("manifest.json")}
    assert main(["run", str(config_file)]) == 0
    second = capsys.readouterr().out
    stage_lines = [line for line in second.splitlines() if line.strip().startswith(("cached", "done"))]
    assert len(stage_lines) == first.count("\n        done") and all(
        line.strip().startswith("cached") for line in stage_lines)
    # nothing was redone: every stage's manifest (its key, its creation time) is the one of the first run
    assert {p: p.read_text() for p in out.rglob("manifest.json")} == manifests
    assert json.loads((out / "report" / "results.json").read_text()) == report

    # --force redoes every stage, training included
    assert main(["run", str(config_file), "--force"]) == 0
    third = capsys.readouterr().out
    assert "cached in" not in third and third.count("        done in") == len(stage_lines)
    assert all(p.read_text() != text for p, text in manifests.items())


def test_a_bad_key_or_value_anywhere_is_refused_before_the_first_stage(tmp_path, tokenizer_dir, capsys):
    base = run_yaml(tmp_path, tokenizer_dir)
    bad = [({"students": [*base["students"][:2], {"name": "kd", "train": {"lrr": 0.1}}]},
            r"unknown config key 'students\[2\]\.train\.lrr'; did you mean 'lr'\?"),
           ({"selections": {"miniplm": {"alpha": 1.5}}}, r"alpha: must be in \(0, 1\]"),
           ({"selections": {"miniplm": {"selectr": "random"}}}, r"'selections\.miniplm\.selectr'; did you mean"),
           ({"score": {"batch_tokens": "many"}}, r"score\.batch_tokens: expected an integer"),
           ({"reference": {"warmup_steps": 1.5}}, r"reference\.warmup_steps: expected an integer"),
           ({"prepare": {"output": "elsewhere"}}, r"prepare\.output: set by `miniplm run`"),
           ({"eval": {"tasks": ["no-such-task"]}}, r"no offline data for no-such-task")]
    for change, message in bad:
        with pytest.raises(ConfigError, match=message):
            load_config(RunConfig, None, {**base, **change})
        config_file = tmp_path / "bad.yaml"
        config_file.write_text(yaml.safe_dump({**base, **change}))
        assert main(["run", str(config_file)]) == 2
        assert "miniplm run: error:" in capsys.readouterr().err
        assert not (tmp_path / "run").exists()  # refused before the first stage wrote anything


def test_run_config_refusals(tmp_path, tokenizer_dir):
    base = run_yaml(tmp_path, tokenizer_dir)
    with pytest.raises(ConfigError, match="not 'all', 'seqkd' or a selection"):
        load_config(RunConfig, None, {**base, "students": [{"name": "x", "data": "nope"}]})
    with pytest.raises(ConfigError, match="names must be unique"):
        load_config(RunConfig, None, {**base, "students": [{"name": "x"}, {"name": "x"}]})
    with pytest.raises(ConfigError, match="seqkd needs a `generate` section"):
        load_config(RunConfig, None, {**base, "students": [{"name": "x", "data": "seqkd"}]})
    with pytest.raises(ConfigError, match="Vanilla KD needs the teacher's tokenizer"):
        load_config(RunConfig, None, {**base, "students": [{"name": "x", "kd": "vanilla", "tokenizer": "gpt2"}]})


def test_seeds_vary_random_draws_and_group_students_into_arms(tmp_path, tokenizer_dir):
    base = run_yaml(tmp_path, tokenizer_dir)
    students = [{"name": f"{arm}-s{seed}", "model": "qwen2-tiny", "data": data, "train": {"seed": seed}}
                for seed in (10, 2) for arm, data in (("no-kd", "all"), ("random", "random-mix"), ("mp", "miniplm"))]
    pipeline = Pipeline(load_config(RunConfig, None, {**base, "students": students}))
    labels = [step.label for step in pipeline.steps()]
    # the random selection is drawn again for seed 2 (seed 10 is its own seed); MiniPLM's is deterministic
    assert "select random-mix@seed2" in labels and not any("miniplm@" in label for label in labels)
    by_name = {s.name: s for s in pipeline.config.students}
    assert pipeline.data(by_name["random-s2"]).name == "random-mix@seed2"
    assert pipeline.data(by_name["random-s10"]).name == "random-mix"
    assert pipeline.select_config("random-mix", 2).seed == 2
    assert [pipeline.arm(s) for s in pipeline.config.students] == [
        ("no-kd-s10", 10), ("random-s10", 10), ("mp-s10", 10), ("no-kd-s10", 2), ("random-s10", 2), ("mp-s10", 2)]
    assert pipeline.report_config().paired[3] == "no-kd-s2:no-kd-s10:2"


def test_a_corpus_without_the_evaluation_domain_is_refused_right_after_prepare(tmp_path, tokenizer_dir, capsys):
    """A user's own corpus (domains news and books, no wikipedia) with the default splits: heldout_hq is empty,
    so the run stops after prepare, before the reference, scoring or any student, saying what to do."""
    base = run_yaml(tmp_path, tokenizer_dir)
    del base["prepare"]["splits"]  # the defaults: heldout_hq takes wikipedia only
    config_file = tmp_path / "mine.yaml"
    config_file.write_text(yaml.safe_dump({**base, "eval": {**base["eval"], "final_splits": ["heldout",
                                                                                            "heldout_unseen"]}}))
    assert main(["run", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert "eval.split: 'heldout_hq' is empty in" in err and "no document has one of its domains: wikipedia" in err
    assert "heldout (" in err and "eval.split=NAME" in err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["corpus", "run_config.json"]

    base["eval"]["split"] = "heldout"  # the whole-mix sample exists: the run goes on, the empty split left out
    pipeline = Pipeline(load_config(RunConfig, None, {**base, "eval": {**base["eval"], "final_splits": [
        "heldout_unseen"]}}))
    pipeline.check_eval_splits()
    assert pipeline.eval_splits() == ["heldout"]
