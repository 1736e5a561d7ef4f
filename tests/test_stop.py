"""A clean stop (core.stop) and progress bars that inform (core.progress): the signal handling in one process,
the bar's rate and ETA as text. Each stage's stop, rerun and byte-identical end: tests/faults."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import pytest
from rich.console import Console

from miniplm.core import stop
from miniplm.core.progress import progress, rate_text


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_the_first_signal_requests_a_stop_that_the_next_unit_boundary_raises(signum, code):
    before = signal.getsignal(signum)
    with stop.graceful_stop(30):
        stop.check()  # nothing requested yet
        os.kill(os.getpid(), signum)
        time.sleep(0.05)  # the handler runs between bytecodes of the main thread
        assert stop.requested() == signum
        with pytest.raises(stop.Stopped) as raised:
            stop.check()
        assert raised.value.exit_code == code
    assert stop.requested() is None and signal.getsignal(signum) == before  # handlers restored


STOPPABLE = """
import os, signal, sys, time
from miniplm.core import stop
with stop.graceful_stop({grace}):
    print("ready", flush=True)
    while True:
        time.sleep(0.01)  # a stage that never reaches a unit boundary
"""


def stoppable(grace: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", STOPPABLE.format(grace=grace)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_stage_that_does_not_stop_within_the_grace_period_is_ended():
    proc = stoppable(grace=1.0)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and 0.9 < time.time() - sent < 10
    assert "SIGTERM received" in err and "still running 1 s after SIGTERM: stopping now" in err


def test_a_second_signal_ends_the_process_at_once():
    proc = stoppable(grace=60.0)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM and time.time() - sent < 5


@pytest.mark.parametrize("speed, unit, text", [(None, "steps", ""), (0.25, "steps", "4.0 s/step"),
                                               (2.345, "steps", "2.3 steps/s"), (12345.6, "tokens", "12,346 tokens/s"),
                                               (0.5, "instances", "2.0 s/instance")])
def test_rates_below_one_unit_a_second_read_as_seconds_per_unit(speed, unit, text):
    assert rate_text(speed, unit) == text


def test_the_bar_shows_the_rate_of_this_process_and_an_eta():
    """A resumed run (2 of 10 steps done before) takes 4 steps at 2 s each: 2.0 s/step, 4 steps left = 8 s."""
    clock = [100.0]
    console = Console(file=io.StringIO(), width=160, force_terminal=False, record=True)
    with progress(True, 10, "train", unit="steps", done=2, console=console, clock=lambda: clock[0]) as advance:
        for _ in range(4):
            clock[0] += 2.0
            advance(1)
    text = console.export_text()
    assert "6/10 steps" in text and "2.0 s/step" in text and "ETA 0:00:08" in text
    assert "0 steps/s" not in text


def test_a_stop_inside_export_drops_its_staged_output_and_the_rerun_is_whole(export_selection, tmp_path,
                                                                              monkeypatch):
    """A stage that writes its output whole (prepare, export, select, eval) abandons it at the unit boundary:
    nothing is left, and the rerun writes what an uninterrupted run writes. The signal is sent from the
    export's own progress callback, so it lands inside the loop."""
    import miniplm.export.export as export_module
    from conftest import export_run

    _, whole = export_run(export_selection, tmp_path / "whole", "megatron")

    class signalling_progress:  # the export's bar: its first advance sends this process a SIGTERM
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return lambda n: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(0.05))

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(export_module, "progress", signalling_progress)
    with stop.graceful_stop(30), pytest.raises(stop.Stopped):
        export_run(export_selection, tmp_path / "stopped", "megatron")
    assert not (tmp_path / "stopped" / "megatron").exists() and not list(tmp_path.rglob("*.partial"))
    monkeypatch.undo()
    _, resumed = export_run(export_selection, tmp_path / "stopped", "megatron")
    files = sorted(p.relative_to(whole) for p in whole.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert files == sorted(p.relative_to(resumed) for p in resumed.rglob("*") if p.is_file()
                           and p.name != "manifest.json")
    assert all((whole / f).read_bytes() == (resumed / f).read_bytes() for f in files)
