"""Fault injection: every long stage, SIGKILLed at seeded random moments, then rerun, ends exactly as if it had
never been interrupted, and leaves no temporary file behind; stopped by SIGTERM, it keeps what it finished,
says how to resume, exits 143 within its grace period, and its rerun ends the same way (one process, torchrun,
Ray).

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


# -- SIGTERM: a clean stop ------------------------------------------------------------------------------------

RESUME_LINE = "rerun the same command to resume"


def timed_whole(cmd: list[str], started, env=None) -> float:
    """Run `cmd` to the end; returns how long its stage ran (from `started()` turning true to the exit)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    while proc.poll() is None and not started():
        time.sleep(0.005)
    begun = time.time()
    _, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    return time.time() - begun


def terminate(cmd: list[str], started, stage_seconds: float, seed: int, env=None) -> tuple[int, str, float]:
    """Start `cmd`, send SIGTERM at a seeded moment of its stage (after `started()`, within the first 60% of
    the stage's uninterrupted time), and wait: (return code, stderr, seconds from the signal to the exit)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    while proc.poll() is None and not started():
        time.sleep(0.005)
    time.sleep(random.Random(seed).uniform(0.0, 0.6) * stage_seconds)
    assert proc.poll() is None, "the stage finished before the signal: give it more work"
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err, time.time() - sent


def staged(output: Path):
    return lambda: output.with_name(output.name + ".partial").is_dir()


def check_clean_stop(tmp_path: Path, seed: int, command, started) -> str:
    """Whole run, then a run stopped by SIGTERM (exit 143 well within the 30 s grace, the resume line), then
    its rerun: byte-identical outputs, no temporary file left. Returns the stopped run's stderr."""
    seconds = timed_whole(command(tmp_path / "whole"), started(tmp_path / "whole"))
    resumed = tmp_path / "resumed"
    code, err, waited = terminate(command(resumed), started(resumed), seconds, seed)
    assert code == 143, err[-3000:]
    assert RESUME_LINE in err and "SIGTERM received" in err and waited < 30
    run_to_end(command(resumed))
    assert_same_outputs(tmp_path / "whole", resumed)
    assert_no_leftovers(tmp_path)
    return err


def test_sigterm_prepare(world, tmp_path):
    raw = make_corpus(tmp_path / "raw", n_docs=2000)
    check_clean_stop(tmp_path / "runs", 11, lambda out: miniplm(
        "prepare", "--inputs", raw, "--tokenizer", world["tokenizer"], "--output", out, "--max-len", 64,
        "--batch-documents", 16, "--progress", "false"), staged)


def test_sigterm_score_keeps_its_finished_parts(world, tmp_path):
    check_clean_stop(tmp_path, 12, lambda out: miniplm(
        "score", "--model", world["model"], "--corpus", world["corpus"], "--output", out, "--precision", "fp32",
        "--part-tokens", 400, "--batch-tokens", 128, "--threads", 1, "--progress", "false"),
        lambda out: lambda: parts(out) >= 1)
    assert (tmp_path / "resumed" / "manifest.json").is_file()


def test_sigterm_generate(world, tmp_path):
    check_clean_stop(tmp_path, 13, lambda out: miniplm(
        "generate", "--model", world["model"], "--corpus", world["corpus"], "--output", out, "--max-instances", 48,
        "--part-instances", 4, "--batch-size", 4, "--prompt-min", 8, "--prompt-max", 24, "--threads", 1,
        "--progress", "false"), lambda out: lambda: parts(out) >= 1)


TRAIN_STEPS = 300  # long enough that the signal lands while it trains (40 tiny steps take under a second)


def train_command(world, out: Path, steps: int = TRAIN_STEPS) -> list[str]:
    return miniplm("train", "--corpus", world["corpus"], "--output", out, "--model", "qwen2-tiny", "--batch-size", 4,
                   "--max-steps", steps, "--warmup-steps", 4, "--save-every", 10, "--log-every", 1, "--precision",
                   "fp32", "--threads", 1, "--progress", "false", "--order", "shuffled")


def newest_checkpoint(output: Path) -> int:
    return max((int(p.name.split("-")[1]) for p in (output / "checkpoints").glob("step-*[0-9]")), default=0)


def assert_stopped_at_a_saved_step(output: Path) -> None:
    """A stopped training run saved the step it finished: its last logged step has a checkpoint (save_every
    alone would have saved only every 10th)."""
    logged = [json.loads(x)["step"] for x in (output / "metrics.jsonl").read_text().splitlines()]
    assert logged and newest_checkpoint(output) == logged[-1] < TRAIN_STEPS


def assert_same_curve(a: Path, b: Path, atol: float = 1e-5) -> None:
    curves = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    assert [r["step"] for r in curves[0]] == [r["step"] for r in curves[1]]
    assert np.allclose([r["loss"] for r in curves[0]], [r["loss"] for r in curves[1]], atol=atol)


def logged_steps(output: Path) -> int:
    path = output / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def at_a_seeded_step(output: Path, seed: int):
    """True once the run has logged a seeded number of steps (well before its end)."""
    target = random.Random(seed).randint(TRAIN_STEPS // 10, TRAIN_STEPS // 3)
    return lambda: logged_steps(output) >= target


def test_sigterm_train_saves_the_step_it_finished(world, tmp_path):
    run_to_end(train_command(world, tmp_path / "whole"))
    resumed = tmp_path / "resumed"
    code, err, waited = terminate(train_command(world, resumed), at_a_seeded_step(resumed, 15), 0.0, 15)
    assert code == 143 and RESUME_LINE in err and waited < 30, err[-3000:]
    assert_stopped_at_a_saved_step(resumed)  # past the last of save_every's checkpoints: nothing lost
    run_to_end(train_command(world, resumed))
    assert_same_curve(tmp_path / "whole", resumed)
    assert_no_leftovers(tmp_path)


def torchrun(port: int, *args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
            *miniplm(*args)[1:]]


def test_sigterm_under_torchrun_stops_every_rank_after_the_same_step(world, tmp_path):
    """torchrun passes the SIGTERM on to its workers; the ranks agree on the step to stop after."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(out: Path) -> list[str]:
        return torchrun(29561, *train_command(world, out)[3:])

    subprocess.run(command(tmp_path / "whole"), check=True, capture_output=True, env=env, timeout=300)
    resumed = tmp_path / "resumed"
    code, err, waited = terminate(command(resumed), at_a_seeded_step(resumed, 16), 0.0, 16, env)
    assert err.count(RESUME_LINE) == 2 and waited < 30, err[-3000:]  # each rank stopped cleanly
    assert_stopped_at_a_saved_step(resumed)
    subprocess.run(command(resumed), check=True, capture_output=True, env=env, timeout=300)
    assert_same_curve(tmp_path / "whole", resumed, atol=1e-6)


def test_sigterm_under_ray_keeps_the_parts_its_actors_finished(world, tmp_path):
    pytest.importorskip("ray")

    def command(out: Path) -> list[str]:
        return miniplm("score", "--model", world["model"], "--corpus", world["corpus"], "--output", out,
                       "--precision", "fp32", "--part-tokens", 100, "--batch-tokens", 128, "--progress", "false",
                       "--executor", "ray", "--ray-actors", 2, "--threads", 1)

    run_to_end(command(tmp_path / "whole"))
    total = parts(tmp_path / "whole")
    target = random.Random(17).randint(total // 10, total // 3)  # Ray scores hundreds of tiny parts a second:
    resumed = tmp_path / "resumed"  # the signal goes out once a seeded number of them is written
    code, err, waited = terminate(command(resumed), lambda: parts(resumed) >= target, 0.0, 17)
    assert code == 143 and RESUME_LINE in err and waited < 30, (code, waited, err[-3000:])
    assert target <= parts(resumed) < total
    run_to_end(command(resumed))
    assert_same_outputs(tmp_path / "whole", resumed)
