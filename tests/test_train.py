import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from miniplm.config import load_config
from miniplm.training.train import TrainConfig, lr_at, masked_loss, train


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

    manifest = train(cfg(prepared_corpus, tmp_path / "run", max_steps=60, lr=3e-3), log=lambda m: None)
    losses = [row["loss"] for row in curve(tmp_path / "run")]
    assert len(losses) == 60 and np.mean(losses[-10:]) < np.mean(losses[:5]) - 0.5
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert sum(p.numel() for p in model.parameters()) == manifest["model"]["parameters"]
    assert not list((tmp_path / "run" / "final").glob("*.pt"))  # no pickles in the exported model


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
    expected = torch.nn.functional.cross_entropy(logits[0, [0, 2]], torch.tensor([2, 8]))
    assert n == 2 and loss.item() == pytest.approx(expected.item())


def test_kill_9_then_resume_follows_the_same_curve(prepared_corpus, tmp_path):
    train(cfg(prepared_corpus, tmp_path / "whole"), log=lambda m: None)
    expected = curve(tmp_path / "whole")
    cmd = [sys.executable, "-m", "miniplm", "train", "--corpus", str(prepared_corpus), "--output",
           str(tmp_path / "resumed"), "--model", "qwen2-tiny", "--batch-size", "4", "--max-steps", "30",
           "--warmup-steps", "5", "--save-every", "10", "--log-every", "1", "--progress", "false",
           "--precision", "fp32", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "resumed" / "checkpoints"
    while proc.poll() is None and not list(checkpoints.glob("step-0000010")):
        time.sleep(0.01)
    time.sleep(0.05)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed, "the run finished before it could be killed"
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    got = curve(tmp_path / "resumed")
    assert [r["step"] for r in got] == list(range(1, 31))
    assert np.allclose([r["loss"] for r in got], [r["loss"] for r in expected], atol=1e-5)
    a = torch.load(tmp_path / "whole" / "checkpoints" / "step-0000030" / "trainer.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "step-0000030" / "trainer.pt", weights_only=True)
    assert a["position"] == b["position"] and a["tokens"] == b["tokens"]
