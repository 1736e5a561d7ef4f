"""Two runs on one output directory: the second is refused with a clear error; a killed holder frees it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import make_corpus
from miniplm.cli import main
from miniplm.core.manifest import output_lock, read_plan, reset_in_place


def test_a_second_run_on_a_busy_output_is_refused(tmp_path, tokenizer_dir, capsys):
    raw = make_corpus(tmp_path / "raw", n_docs=5)
    out = tmp_path / "corpus"
    argv = ["prepare", "--inputs", str(raw), "--tokenizer", str(tokenizer_dir), "--output", str(out),
            "--max-len", "64", "--progress", "false"]
    with output_lock(out):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{out} is being written by miniplm pid" in err and "choose another output directory" in err
        assert not out.exists()
    assert not (tmp_path / "corpus.lock").exists()  # released and removed
    assert main(argv) == 0 and (out / "manifest.json").is_file()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from miniplm.core.manifest import output_lock\n"
        f"with output_lock({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    started = time.time()
    with output_lock(out):  # the kernel released the dead holder's lock
        assert time.time() - started < 5


def test_a_resumed_output_counts_the_time_of_its_interrupted_attempts(tmp_path):
    output = tmp_path / "run"
    reset_in_place(output, "key", False, print)
    for wrote_after, total in ((60.0, 60.0), (30.0, 90.0)):  # each attempt killed after its last write
        started = read_plan(output)["started"]
        for earlier in output.glob("part-*"):  # written by the earlier attempts, before this one started
            os.utime(earlier, (started - 1000, started - 1000))
        part = output / f"part-{total}"
        part.write_text("done")
        os.utime(part, (started + wrote_after, started + wrote_after))
        reset_in_place(output, "key", False, print)
        assert read_plan(output)["seconds_before"] == pytest.approx(total, abs=0.1)
    assert read_plan(output)["attempts"] == 3
    reset_in_place(output, "another key", False, print)  # a changed config starts the count anew
    assert read_plan(output)["attempts"] == 1 and read_plan(output)["seconds_before"] == 0
