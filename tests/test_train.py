import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from miniplm.core.config import load_config
from miniplm.data.shards import PackedCorpus
from miniplm.training.train import Batches, TrainConfig, lr_at, masked_loss, planned_warmup, split_validation, train


def cfg(corpus, output, **kw) -> TrainConfig:
    base = {"corpus": str(corpus), "output": str(output), "model": "qwen2-tiny", "batch_size": 4,
            "max_steps": 30, "warmup_steps": 5, "save_every": 10, "log_every": 1, "progress": False,
            "precision": "fp32", "threads": 1}
    base.update(kw)
    return load_config(TrainConfig, None, base)


def curve(output):
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_the_checkpoint_loads_in_plain_transformers(prepared_corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    manifest = train(cfg(prepared_corpus, tmp_path / "run", max_steps=60, lr=3e-3), log=lambda m: None).manifest
    losses = [row["loss"] for row in curve(tmp_path / "run")]
    assert len(losses) == 60 and np.mean(losses[-10:]) < np.mean(losses[:5]) - 0.5
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert sum(p.numel() for p in model.parameters()) == manifest["model"]["parameters"]
    assert not list((tmp_path / "run" / "final").glob("*.pt"))  # no pickles in the exported model


def test_force_retrains_through_the_api_the_cli_and_run(prepared_corpus, tmp_path, capsys):
    """--force means the same for train as for every stage: a finished run is trained again, from step 0."""
    from miniplm.cli import main

    first = train(cfg(prepared_corpus, tmp_path / "run", max_steps=4), log=lambda m: None)
    assert first.ran
    cached = train(cfg(prepared_corpus, tmp_path / "run", max_steps=4), log=lambda m: None)
    assert not cached.ran and cached.manifest == first.manifest
    logs = []
    forced = train(cfg(prepared_corpus, tmp_path / "run", max_steps=4), force=True, log=logs.append)
    assert forced.ran and forced.manifest["created"] >= first.manifest["created"]
    assert not any("resuming" in m for m in logs)  # started over, not resumed from the last checkpoint
    assert [row["step"] for row in curve(tmp_path / "run")] == [1, 2, 3, 4]
    args = ["train", "--corpus", str(prepared_corpus), "--output", str(tmp_path / "run"), "--max-steps", "4",
            "--model", "qwen2-tiny",
            "--batch-size", "4", "--warmup-steps", "5", "--precision", "fp32", "--progress", "false",
            "--save-every", "100"]
    assert main(args) == 0 and "up to date" in capsys.readouterr().out
    before = (tmp_path / "run" / "manifest.json").read_text()
    assert main([*args, "--force"]) == 0 and "up to date" not in capsys.readouterr().out
    assert (tmp_path / "run" / "manifest.json").read_text() != before


def test_lr_schedule_and_masked_loss():
    assert lr_at(0, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(55, 100, 1.0, 10, 0.1) == pytest.approx(0.55)
    tokens = torch.tensor([[5, 2, 7, 8, 0]])
    real = torch.tensor([[True, True, True, True, False]])
    logits = torch.randn(1, 5, 10)
    loss, n = masked_loss(logits, tokens, real, torch.tensor([2]))
    # positions: 5->2 (kept), 2->7 (input EOS: masked), 7->8 (kept), 8->pad (padding: masked)
    expected = torch.nn.functional.cross_entropy(logits[0, [0, 2]], torch.tensor([2, 8]), reduction="sum")
    assert n == 2 and loss.item() == pytest.approx(expected.item())


@pytest.mark.parametrize("family", ["llama", "gptneox", "mamba"])
def test_each_family_trains_and_its_loss_falls(family, prepared_corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    manifest = train(cfg(prepared_corpus, tmp_path / family, model=f"{family}-tiny", max_steps=25, lr=5e-3,
                         save_every=25), log=lambda m: None).manifest
    losses = [row["loss"] for row in curve(tmp_path / family)]
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 0.3, losses
    model = AutoModelForCausalLM.from_pretrained(tmp_path / family / "final")
    assert model.config.model_type == {"llama": "llama", "gptneox": "gpt_neox", "mamba": "mamba"}[family]
    assert manifest["model"]["parameters"] == sum(p.numel() for p in model.parameters())


def test_vanilla_kd_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    tokens = torch.tensor([[3, 4, 2, 5, 6], [7, 8, 9, 1, 2]])
    real = torch.ones_like(tokens, dtype=torch.bool)
    student, teacher = torch.randn(2, 5, 12), torch.randn(2, 5, 14)  # the teacher may have padding rows
    masked = torch.tensor([2])
    loss, n = masked_loss(student, tokens, real, masked, teacher, kd_lambda=0.3, temperature=2.0)
    total, count = 0.0, 0
    for b in range(2):
        for t in range(4):
            if tokens[b, t] == 2:
                continue
            ce = -torch.log_softmax(student[b, t], -1)[tokens[b, t + 1]]
            p = torch.softmax(teacher[b, t, :12] / 2.0, -1)
            kd = -(p * torch.log_softmax(student[b, t] / 2.0, -1)).sum()
            total, count = total + 0.7 * ce + 0.3 * kd, count + 1
    # mean of the mixture = mixture of the means over the same positions
    assert n == count == 7 and loss.item() == pytest.approx(total.item(), rel=1e-5)
    plain, _ = masked_loss(student, tokens, real, masked)
    assert masked_loss(student, tokens, real, masked, teacher, kd_lambda=0.0)[0].item() == pytest.approx(plain.item())


def test_vanilla_kd_trains_with_matched_flops_and_refuses_another_vocabulary(prepared_corpus, tiny_model_dir,
                                                                              tmp_path):
    logs = []
    manifest = train(cfg(prepared_corpus, tmp_path / "kd", kd="vanilla", teacher=str(tiny_model_dir),
                         match_flops=True, max_steps=20), log=logs.append).manifest
    assert any("--match-flops: 20 steps ->" in m for m in logs)
    assert manifest["steps"] < 20 and len(curve(tmp_path / "kd")) == manifest["steps"]
    # its warmup shrinks with its steps (5 of 20 -> the same share of its own), so it never ends inside warmup
    assert manifest["warmup_steps"] == max(1, round(5 * manifest["steps"] / 20)) < manifest["steps"]
    lrs = [row["lr"] for row in curve(tmp_path / "kd")]
    assert lrs.index(max(lrs)) == manifest["warmup_steps"] - 1 and lrs[-1] < max(lrs)
    with pytest.raises(ValueError, match="needs one vocabulary"):
        train(cfg(prepared_corpus, tmp_path / "kd2", kd="vanilla", teacher="smollm2"), log=lambda m: None)


def test_seqkd_generation_is_reproducible_resumable_and_trainable(prepared_corpus, tiny_model_dir, tmp_path):
    from miniplm.data.shards import PackedCorpus
    from miniplm.kd.generate import GenerateConfig, generate

    def gen(out, **kw):
        return generate(load_config(GenerateConfig, None, {
            "model": str(tiny_model_dir), "corpus": str(prepared_corpus), "output": str(out), "prompt_min": 4,
            "prompt_max": 12, "max_instances": 10, "part_instances": 4, "batch_size": 3, "progress": False, **kw}),
            log=lambda m: None).manifest

    manifest = gen(tmp_path / "a")
    gen(tmp_path / "b")
    a, b = PackedCorpus(tmp_path / "a").split("train"), PackedCorpus(tmp_path / "b").split("train")
    source = PackedCorpus(prepared_corpus).split("train")
    assert len(a) == 10 and manifest["generated_tokens"] > 0
    for i in range(10):
        assert a[i].tolist() == b[i].tolist()  # the same seed gives the same corpus
        assert len(a[i]) <= 65
        prompt = pq.read_table(tmp_path / "a" / "parts" / f"part-{i // 4:06d}.parquet").to_pylist()[i % 4]
        assert 4 <= prompt["prompt_tokens"] <= 12
        assert a[i][: prompt["prompt_tokens"]].tolist() == source[i][: prompt["prompt_tokens"]].tolist()
    other = gen(tmp_path / "c", seed=11)
    assert other["generated_tokens"] > 0 and any(
        PackedCorpus(tmp_path / "c").split("train")[i].tolist() != a[i].tolist() for i in range(10))
    # a lost part is regenerated identically on the next run
    (tmp_path / "a" / "parts" / "part-000001.parquet").unlink()
    (tmp_path / "a" / "manifest.json").unlink()
    gen(tmp_path / "a")
    assert [PackedCorpus(tmp_path / "a").split("train")[i].tolist() for i in range(10)] == \
        [b[i].tolist() for i in range(10)]
    train(cfg(tmp_path / "a", tmp_path / "student", max_steps=3, save_every=3), log=lambda m: None)


@pytest.mark.slow
def test_ddp_two_ranks_follow_the_single_process_curve(prepared_corpus, tmp_path):
    import os

    train(cfg(prepared_corpus, tmp_path / "one", max_steps=12, save_every=6), log=lambda m: None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29541",
           "-m", "miniplm", "train", "--corpus", str(prepared_corpus), "--output", str(tmp_path / "two"),
           "--model", "qwen2-tiny", "--batch-size", "4", "--max-steps", "12", "--warmup-steps", "5",
           "--save-every", "6", "--log-every", "1", "--progress", "false", "--precision", "fp32", "--threads", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert [r["step"] for r in two] == list(range(1, 13)) and [r["tokens"] for r in one] == [r["tokens"] for r in two]
    assert np.allclose([r["loss"] for r in one], [r["loss"] for r in two], atol=2e-4)


def test_warmup_as_a_fraction_of_the_run():
    config = TrainConfig(warmup_steps=100, warmup_fraction=0.1)
    assert planned_warmup(config, 37, 37) == 4
    assert planned_warmup(TrainConfig(warmup_steps=20), 13, 52) == 5  # a FLOP-matched cut of 52 -> 13 steps


def test_shuffled_order_is_seeded_covers_each_epoch_once_and_skips_the_validation_slice(prepared_corpus, tmp_path):
    split = PackedCorpus(prepared_corpus).split("train")
    training, validating = split_validation(len(split), 0.1)
    assert len(validating) == len(split) // 10 and not set(training) & set(validating)

    def order(seed: int, shuffled: bool = True) -> list[int]:
        batches = Batches(split, training, 4, 0, shuffled, seed)
        return [batches.index(p) for p in range(2 * len(training))]

    first = order(1)
    assert first == order(1) and first != order(2) and order(1, shuffled=False)[: len(training)] == list(training)
    for epoch in (first[: len(training)], first[len(training):]):  # every training instance once per epoch
        assert sorted(epoch) == list(training)
    assert first[: len(training)] != first[len(training):]  # shuffled anew each epoch

    runs = [train(cfg(prepared_corpus, tmp_path / name, order="shuffled", seed=seed, max_steps=8),
                  log=lambda m: None) for name, seed in (("a", 3), ("b", 3), ("c", 4))]
    a, b, c = (curve(tmp_path / name) for name in "abc")
    assert [r["loss"] for r in a] == [r["loss"] for r in b] != [r["loss"] for r in c]
    assert runs[0].manifest["key"] != runs[2].manifest["key"]


def test_validation_slice_early_stopping_keeps_the_best_model(prepared_corpus, tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "ref"
    manifest = train(cfg(prepared_corpus, run, split="ref", max_steps=400, lr=0.05, warmup_steps=2,
                         validation_fraction=0.2, validate_every=5, patience=2, save_every=1000),
                     log=lambda m: None).manifest
    rows = [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()]
    best = min(range(len(rows)), key=lambda i: rows[i]["loss_per_token"])
    assert manifest["validation"]["best"] == rows[best]
    assert manifest["validation"]["stopped_early"] and manifest["steps"] < 400
    assert len(rows) - 1 - best == 2 and rows[-1]["step"] == manifest["steps"]  # stopped after 2 without a new best
    final = load_file(run / "final" / "model.safetensors")
    kept = load_file(run / "best" / "model.safetensors")
    assert all(torch.equal(final[k], kept[k]) for k in final)
    with pytest.raises(Exception, match="needs a validation slice"):
        cfg(prepared_corpus, run, patience=2)
