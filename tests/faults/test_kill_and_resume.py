"""Fault injection: every long stage, SIGKILLed at seeded random moments, then rerun, ends exactly as if it had
never been interrupted, and leaves no temporary file behind.

For each stage: one uninterrupted run (its wall time D), then `MINIPLM_FAULT_KILLS` (default 5) runs of the
same command into a second directory, each SIGKILLed at a seeded moment in [0.3 D, 0.9 D] (past start-up,
which is mostly imports), then one run to the end. Outputs are compared byte for byte (manifests without
their timestamps and timings); training compares the loss curve and the final weights. `make faults` runs
the full count; CI runs the default.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_corpus, save_tiny_llama

KILLS = int(os.environ.get("MINIPLM_FAULT_KILLS", "5"))
VOLATILE = {"created", "wall_seconds", "attempts", "started", "seconds_before", "throughput", "versions"}
LEFTOVERS = ("*.tmp", "*.partial", "*.old", "*.lock")
pytestmark = pytest.mark.slow


def miniplm(*args) -> list[str]:
    return [sys.executable, "-m", "miniplm", *[str(a) for a in args]]


def run_to_end(cmd: list[str]) -> float:
    started = time.time()
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return time.time() - started


def kill_then_resume(cmd: list[str], duration: float, seed: int, progress=None, total: int = 0) -> int:
    """KILLS runs killed at seeded moments, then one to the end; returns how many were killed mid-run.

    A stage that starts over when rerun (prepare, select, export) is killed at a seeded time in
    [0.3 D, 0.9 D]. A stage that resumes by parts or checkpoints would finish ever sooner, so it is killed
    at a seeded point of its progress instead: once `progress()` (durable parts or checkpoints) reaches a
    seeded target ahead of where it resumed, plus a seeded fraction of one unit's time, i.e. mid-unit."""
    rng = random.Random(seed)
    unit = duration / max(total, 1)
    killed = 0
    for _ in range(KILLS):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if progress is None:
            deadline = time.time() + rng.uniform(0.3, 0.9) * duration
        else:
            done = progress()
            target = min(total - 1, done + rng.randint(1, max(1, (total - done) // 3)))
            while proc.poll() is None and progress() < target:
                time.sleep(0.005)
            deadline = time.time() + rng.uniform(0.0, 1.0) * unit
        while proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed += 1
    run_to_end(cmd)
    return killed


def files(root: Path) -> dict[str, bytes]:
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name in ("manifest.json", "plan.json"):  # the plan also times the attempts
            manifest = json.loads(data)
            data = json.dumps(_without(manifest, str(root)), sort_keys=True).encode()
        out[str(path.relative_to(root))] = data
    return out


def _without(value, root: str):
    """A manifest without what differs between two runs: timestamps, timings, and its own output path."""
    if isinstance(value, dict):
        return {k: _without(v, root) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_without(v, root) for v in value]
    return "<output>" if isinstance(value, str) and value.startswith(root) else value


def assert_same_outputs(whole: Path, resumed: Path) -> None:
    a, b = files(whole), files(resumed)
    assert sorted(a) == sorted(b)
    different = [name for name in a if a[name] != b[name]]
    assert not different, f"files differ after kill and resume: {different}"


def assert_no_leftovers(root: Path) -> None:
    left = [str(p) for pattern in LEFTOVERS for p in root.rglob(pattern)]
    assert not left, f"temporary files survived: {left}"


def check_stage(tmp_path: Path, seed: int, command, progress=None) -> None:
    """`command(output)` builds the stage's command line for an output directory; `progress(output)` counts
    its durable units for a stage that resumes by parts."""
    duration = run_to_end(command(tmp_path / "whole"))
    total = progress(tmp_path / "whole") if progress else 0
    resumed = tmp_path / "resumed"
    killed = kill_then_resume(command(resumed), duration, seed, progress and (lambda: progress(resumed)), total)
    assert killed >= min(KILLS, 3), f"only {killed} of {KILLS} runs were killed before they finished"
    assert_same_outputs(tmp_path / "whole", resumed)
    assert_no_leftovers(tmp_path)
    manifest = json.loads((resumed / "manifest.json").read_text())
    if "attempts" in manifest:  # an in-place stage: its wall_seconds add up the killed attempts
        assert 1 < manifest["attempts"] <= killed + 1


def parts(output: Path) -> int:
    return len(list((output / "parts").glob("part-*.parquet")))


def checkpoints(output: Path) -> int:
    """Checkpoint steps written so far (older ones are pruned: read the newest step, in units of save_every)."""
    steps = [int(p.name.split("-")[1]) for p in (output / "checkpoints").glob("step-*[0-9]")]
    return max(steps, default=0) // 4


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_dir):
    """A corpus, a model, scores and a selection shared by the stage tests (built without interruption)."""
    root = tmp_path_factory.mktemp("faults")
    corpus = root / "corpus"
    run_to_end(miniplm("prepare", "--inputs", make_corpus(root / "raw", n_docs=150), "--tokenizer", tokenizer_dir,
                       "--output", corpus, "--max-len", 64, "--progress", "false"))
    model = save_tiny_llama(root / "model", tokenizer_dir, layers=4)
    for name in ("teacher", "ref"):
        run_to_end(miniplm("score", "--model", model, "--corpus", corpus, "--output", root / name, "--precision",
                           "fp32", "--progress", "false"))
    run_to_end(miniplm("select", "--corpus", corpus, "--teacher", root / "teacher", "--reference", root / "ref",
                       "--output", root / "selection", "--report", "false", "--progress", "false"))
    return {"root": root, "corpus": corpus, "model": model, "tokenizer": tokenizer_dir}


def test_prepare(world, tmp_path):
    raw = make_corpus(tmp_path / "raw", n_docs=600)
    check_stage(tmp_path / "runs", 1, lambda out: miniplm(
        "prepare", "--inputs", raw, "--tokenizer", world["tokenizer"], "--output", out, "--max-len", 64,
        "--shuffle", "true", "--batch-documents", 16, "--progress", "false"))


def test_score(world, tmp_path):
    check_stage(tmp_path, 2, lambda out: miniplm(
        "score", "--model", world["model"], "--corpus", world["corpus"], "--output", out, "--precision", "fp32",
        "--part-tokens", 400, "--batch-tokens", 128, "--threads", 1, "--progress", "false"), parts)


def test_select(world, tmp_path):
    check_stage(tmp_path, 3, lambda out: miniplm(
        "select", "--corpus", world["corpus"], "--teacher", world["root"] / "teacher", "--reference",
        world["root"] / "ref", "--output", out, "--report", "false", "--progress", "false"))


def test_export(world, tmp_path):
    check_stage(tmp_path, 4, lambda out: miniplm(
        "export", "--selection", world["root"] / "selection", "--subset", "all", "--format", "megatron",
        "--tokenizer", world["tokenizer"], "--output", out, "--progress", "false"))


def test_generate(world, tmp_path):
    check_stage(tmp_path, 5, lambda out: miniplm(
        "generate", "--model", world["model"], "--corpus", world["corpus"], "--output", out, "--max-instances", 48,
        "--part-instances", 4, "--batch-size", 4, "--prompt-min", 8, "--prompt-max", 24, "--threads", 1,
        "--progress", "false"), parts)


def test_train(world, tmp_path):
    def command(out):
        return miniplm("train", "--corpus", world["corpus"], "--output", out, "--model", "qwen2-tiny",
                       "--batch-size", 4, "--max-steps", 40, "--warmup-steps", 4, "--save-every", 4,
                       "--log-every", 1, "--precision", "fp32", "--threads", 1, "--progress", "false",
                       "--order", "shuffled", "--validation-fraction", 0.1, "--validate-every", 4)

    duration = run_to_end(command(tmp_path / "whole"))
    resumed = tmp_path / "resumed"
    killed = kill_then_resume(command(resumed), duration, 6, lambda: checkpoints(resumed), 10)
    assert killed >= min(KILLS, 3), f"only {killed} of {KILLS} runs were killed before they finished"
    curves = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("whole", "resumed")]
    assert [r["step"] for r in curves[1]] == list(range(1, 41))
    validation = [[json.loads(x) for x in (tmp_path / d / "validation.jsonl").read_text().splitlines()]
                  for d in ("whole", "resumed")]
    assert [r["step"] for r in validation[1]] == list(range(4, 41, 4))
    assert np.allclose([r["loss_per_token"] for r in validation[0]], [r["loss_per_token"] for r in validation[1]],
                       atol=1e-5)
    assert np.allclose([r["loss"] for r in curves[0]], [r["loss"] for r in curves[1]], atol=1e-5)
    from safetensors.numpy import load_file

    a = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(np.allclose(a[k], b[k], atol=1e-5) for k in a)
    states = [torch.load(tmp_path / d / "checkpoints" / "step-0000040" / "trainer.pt", weights_only=True)
              for d in ("whole", "resumed")]
    assert [(s["position"], s["tokens"]) for s in states[:1]] == [(s["position"], s["tokens"]) for s in states[1:]]
    assert_no_leftovers(tmp_path)
