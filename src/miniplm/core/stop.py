"""A clean stop on SIGTERM and SIGINT: keep what is complete, say how to resume, exit 128 + the signal.

Clusters stop a job with SIGTERM and a grace period (Slurm, Kubernetes, preemptible VMs); a person at a
terminal presses Ctrl-C. Under `graceful_stop(grace_s)` (the CLI's, around every command) the first signal
only records a request; each stage reads it at its unit boundaries through `check()`: a training run saves a
checkpoint of the step it finished, scoring and generation keep their finished parts, a stage that writes its
output whole abandons it; then `Stopped` unwinds to the CLI, which prints how to resume and exits with
128 + the signal's number (143 for SIGTERM, 130 for SIGINT). A second signal, or a stage still running when
the grace period ends, ends the process at once: what is left is what a kill -9 leaves, from which every
stage resumes too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_requested: int | None = None
_handler = None  # the installed handler while graceful_stop is active (reinstalled after libraries replace it)


class Stopped(Exception):
    """A stop was requested and the running stage has kept what it completed."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def requested() -> int | None:
    """The signal that asked for a stop, None while none has."""
    return _requested


def check() -> None:
    """Raise `Stopped` if a stop was requested: call it where the current unit of work is complete."""
    if _requested is not None:
        raise Stopped(_requested)


def reclaim() -> None:
    """Install the stop handler again after a library replaced it (ray.init sets its own SIGTERM handler)."""
    if _handler is not None and _requested is None and threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            signal.signal(signum, _handler)


@contextlib.contextmanager
def graceful_stop(grace_s: float):
    """Within this block the first SIGTERM/SIGINT requests a stop (`check()`); a second one, or `grace_s`
    seconds without the process ending, stops it at once."""
    global _requested, _handler
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    timers: list[threading.Timer] = []

    def expire(signum: int) -> None:
        print(f"miniplm: still running {grace_s:g} s after {signal.Signals(signum).name}: stopping now (what "
              "finished is kept; rerun the same command to resume)", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def handle(signum: int, frame) -> None:
        global _requested
        _requested = signum
        for other in SIGNALS:  # the next signal takes the default action: the process ends at once
            signal.signal(other, signal.SIG_DFL)
        print(f"miniplm: {signal.Signals(signum).name} received: finishing the current unit of work, keeping what "
              f"is complete, then stopping (at most {grace_s:g} s; a second signal stops at once)",
              file=sys.stderr, flush=True)
        timer = threading.Timer(grace_s, expire, args=(signum,))
        timer.daemon = True
        timer.start()
        timers.append(timer)

    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    _requested, _handler = None, handle
    for signum in SIGNALS:
        signal.signal(signum, handle)
    try:
        yield
    finally:
        for timer in timers:
            timer.cancel()
        for signum, action in previous.items():
            signal.signal(signum, action)
        _requested, _handler = None, None
