"""Evaluation: lm-eval on local tasks against a direct computation, scaling fits, eval loss, the report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import save_tiny_llama
from miniplm.core.config import ConfigError, load_config
from miniplm.evaluation.report import ReportConfig, build_report
from miniplm.evaluation.scaling import compute_saving, fit_scaling_law, measured_saving, read_curve


def law(c, a=400.0, alpha=0.12, l_inf=2.5):
    return a * np.power(c, -alpha) + l_inf


def test_fit_recovers_known_parameters_from_noisy_points():
    rng = np.random.default_rng(0)
    compute = np.geomspace(1e15, 1e19, 16)
    loss = law(compute) * (1 + rng.normal(0, 0.002, len(compute)))
    fit = fit_scaling_law(compute, loss)
    assert fit.alpha == pytest.approx(0.12, rel=0.15)
    assert fit.L_inf == pytest.approx(2.5, abs=0.15)
    assert fit.rmse < 0.02 and len(fit.residuals) == 16
    assert float(fit.loss_at(1e20)) == pytest.approx(float(law(1e20)), rel=0.01)  # extrapolation
    with pytest.raises(ValueError, match="at least 3"):
        fit_scaling_law([1e15, 1e16], [3.0, 2.9])


def test_compute_saving_on_synthetic_curves():
    compute = np.geomspace(1e15, 1e18, 12)
    baseline = fit_scaling_law(compute, law(compute))
    better = fit_scaling_law(compute, law(2.2 * compute))  # reaches every loss with 2.2x less compute
    target = float(law(compute[-1]))
    assert compute_saving(baseline, better, target) == pytest.approx(2.2, rel=0.02)
    assert compute_saving(better, baseline, target) == pytest.approx(1 / 2.2, rel=0.02)
    worse_floor = fit_scaling_law(compute, law(compute, l_inf=3.5))
    assert compute_saving(baseline, worse_floor, 3.0) == 0.0  # the worse run never reaches 3.0



def test_measured_saving_reads_the_points_without_extrapolating():
    compute = np.geomspace(1e15, 1e18, 24)
    baseline, better = (compute, law(compute)), (compute, law(2.2 * compute))
    assert measured_saving(baseline, better) == pytest.approx(2.2, rel=0.02)
    assert measured_saving(better, baseline) == pytest.approx(1 / 2.2, rel=0.02)
    # the better run starts below the baseline's final loss: no measured pair brackets it
    far_better = (compute, np.full_like(compute, law(compute[-1]) - 0.5))
    assert np.isnan(measured_saving(baseline, far_better))
    assert np.isnan(measured_saving(far_better, baseline))

def _direct_piqa_and_lambada(model, tokenizer, piqa_docs, lambada_texts):
    """The same zero-shot comparisons lm-eval makes, computed by hand from the model's log-probs."""

    def continuation_logprob(context: str, continuation: str) -> tuple[float, bool]:
        whole = tokenizer.encode(context + continuation)
        n_context = len(tokenizer.encode(context))
        ids = torch.tensor([whole])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        targets = ids[0, n_context:]
        rows = logp[n_context - 1 :]
        return float(rows.gather(1, targets[:, None]).sum()), bool((rows.argmax(-1) == targets).all())

    acc, acc_norm = [], []
    for doc in piqa_docs:
        context, choices = f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]]
        lls = np.array([continuation_logprob(context, " " + c)[0] for c in choices])
        acc.append(float(np.argmax(lls) == doc["label"]))
        acc_norm.append(float(np.argmax(lls / np.array([len(c) for c in choices])) == doc["label"]))
    greedy = []
    for text in lambada_texts:
        words = text.split(" ")
        greedy.append(float(continuation_logprob(" ".join(words[:-1]), " " + words[-1])[1]))
    return np.mean(acc), np.mean(acc_norm), np.mean(greedy)


def test_lm_eval_local_tasks_equal_a_direct_computation(tokenizer_dir, tmp_path, monkeypatch):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from miniplm.evaluation.tasks import EvalTasksConfig, evaluate_tasks, write_local_tasks

    monkeypatch.setenv("MINIPLM_CACHE", str(tmp_path / "cache"))
    model_dir = save_tiny_llama(tmp_path / "model", tokenizer_dir, seed=3, context=4096)
    limit = 12
    result = evaluate_tasks(load_config(EvalTasksConfig, None, {
        "model": str(model_dir), "tasks": ["piqa", "lambada_openai"], "limit": limit,
        "output": str(tmp_path / "tasks.json")}), log=lambda m: None)
    assert json.loads((tmp_path / "tasks.json").read_text())["average"] == pytest.approx(result["average"])

    task_dir = tmp_path / "cache" / "lm_eval_tasks"
    write_local_tasks(task_dir, ["piqa", "lambada_openai"])
    piqa_yaml = json.loads((task_dir / "piqa_local.yaml").read_text())
    piqa = datasets.Dataset.from_file(piqa_yaml["dataset_kwargs"]["data_files"]["validation"][0])
    lambada = [json.loads(line)["text"] for line in (task_dir / "lambada_openai.jsonl").read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    acc, acc_norm, greedy = _direct_piqa_and_lambada(model, tokenizer, list(piqa)[:limit], lambada[:limit])
    assert result["tasks"]["piqa"]["acc"] == pytest.approx(acc)
    assert result["tasks"]["piqa"]["acc_norm"] == pytest.approx(acc_norm)
    assert result["tasks"]["piqa"]["metric"] == "acc_norm" and result["tasks"]["piqa"]["examples"] == limit
    assert result["tasks"]["lambada_openai"]["value"] == pytest.approx(greedy)
    assert result["average"] == pytest.approx((acc_norm + greedy) / 2)


def test_eval_every_curve_and_eval_loss_of_a_run_agree(prepared_corpus, tmp_path):
    from miniplm.evaluation.loss import EvalLossConfig, evaluate_loss
    from miniplm.training.train import TrainConfig, train

    run = tmp_path / "run"
    manifest = train(load_config(TrainConfig, None, {
        "corpus": str(prepared_corpus), "output": str(run), "model": "qwen2-tiny", "batch_size": 4,
        "max_steps": 12, "warmup_steps": 2, "save_every": 6, "log_every": 1, "progress": False,
        "precision": "fp32", "eval_every": 6, "eval_split": "heldout", "eval_max_instances": 8, "lr": 3e-3}),
        log=lambda m: None).manifest
    points = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [p["step"] for p in points] == [6, 12]
    n = manifest["model"]["parameters"]
    assert points[-1]["tokens"] == manifest["tokens"] and points[-1]["flops"] == 6 * n * manifest["tokens"]

    result = evaluate_loss(load_config(EvalLossConfig, None, {
        "model": str(run), "corpus": str(prepared_corpus), "split": "heldout", "max_instances": 8,
        "precision": "fp32", "progress": False}), log=lambda m: None)
    assert [p["step"] for p in result["points"]] == [6, 12]  # both checkpoints kept (keep_checkpoints 2)
    for during, after in zip(points, result["points"]):
        assert after["loss_per_token"] == pytest.approx(during["loss_per_token"], abs=1e-5)
        assert after["flops"] == during["flops"]
    assert json.loads((run / "eval_loss.json").read_text())["points"][-1]["step"] == 12
    flops, loss = read_curve(run)
    assert list(flops) == [p["flops"] for p in points]
    assert result["points"][-1]["loss_per_instance"] > 0 and math.isfinite(result["points"][-1]["loss_per_instance"])


def test_report_renders_fits_savings_and_tasks(tmp_path):
    compute = np.geomspace(1e12, 1e15, 8)
    for name, shift in (("no-kd", 1.0), ("miniplm", 2.0)):
        run = tmp_path / name
        run.mkdir()
        rows = [{"step": i, "tokens": i, "flops": float(c), "loss_per_token": float(law(shift * c)),
                 "loss_per_instance": float(law(shift * c))} for i, c in enumerate(compute, 1)]
        (run / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / "eval_tasks.json").write_text(json.dumps({"limit": 10, "average": 0.5 * shift / 2, "tasks": {
            "piqa": {"value": 0.6}, "hellaswag": {"value": 0.3}}}))
    path = build_report(load_config(ReportConfig, None, {
        "runs": [str(tmp_path / "no-kd"), f"MiniPLM={tmp_path / 'miniplm'}"], "output": str(tmp_path / "report"),
        "extrapolate_to": 1e16}), log=lambda m: None).output / "report.md"
    text = path.read_text()
    assert "| MiniPLM |" in text and "(baseline)" in text and "| run | piqa | hellaswag | Avg. |" in text
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert results["runs"]["MiniPLM"]["compute_saving"] == pytest.approx(2.0, rel=0.03)
    assert (tmp_path / "report" / "loss_vs_compute.png").stat().st_size > 10_000
    assert "<table>" in (tmp_path / "report" / "report.html").read_text()


def test_report_gives_paired_differences_by_seed(tmp_path):
    finals = {("base", 1): 5.0, ("base", 2): 5.4, ("base", 3): 5.2, ("arm", 1): 4.9, ("arm", 2): 5.1, ("arm", 3): 5.3}
    runs, paired = [], []
    for (arm, seed), loss in finals.items():
        run = tmp_path / f"{arm}-{seed}"
        run.mkdir()
        rows = [{"step": 1, "tokens": 1, "flops": 1e12, "loss_per_token": loss + 1, "bits_per_byte": 2.0},
                {"step": 2, "tokens": 2, "flops": 2e12, "loss_per_token": loss, "bits_per_byte": loss / 2}]
        (run / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(f"{arm}-{seed}={run}")
        paired.append(f"{arm}-{seed}:{arm}:{seed}")
    build_report(load_config(ReportConfig, None, {"runs": runs, "paired": paired, "output": str(tmp_path / "r")}),
                 log=lambda m: None)
    results = json.loads((tmp_path / "r" / "results.json").read_text())["paired_differences"]
    diffs = np.array([finals[("arm", s)] - finals[("base", s)] for s in (1, 2, 3)])
    got = results["arm"]["loss_per_token (curve)"]
    assert got["mean_difference"] == pytest.approx(diffs.mean()) and got["std_difference"] == pytest.approx(
        diffs.std(ddof=1))
    assert results["arm"]["seeds"] == [1, 2, 3] and "base" not in results
    assert "## Paired differences across seeds" in (tmp_path / "r" / "report.md").read_text()
    with pytest.raises(ConfigError, match="is not RUN:ARM:SEED"):
        load_config(ReportConfig, None, {"runs": runs, "paired": ["a:b"]})
