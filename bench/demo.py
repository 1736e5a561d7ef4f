"""The README's promise, measured: `make demo` on a fresh clone of this checkout, set-up included.

    .venv/bin/python bench/demo.py                 # clones HEAD into a temporary directory and runs make demo
    .venv/bin/python bench/demo.py --keep /tmp/d   # the same, keeping the clone (its out/demo, its .venv)

Prints a markdown table: the set-up (`make setup`: the virtual environment and the packages, from pip's
cache when it has them), each stage as the run reports it ("done in N s"), and the total wall time against
the promise (15 minutes); then the table the demo printed. Run it on a quiet machine: nothing else on the
cores.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

PROMISE_S = 15 * 60
STAGE = re.compile(r"^\[\s*\d+/\d+\] (?P<stage>.+) \.\.\.$")
DONE = re.compile(r"^\s+(?:done|cached) in (?P<seconds>[\d.]+) s")


def stage_times(log: str) -> list[tuple[str, float]]:
    """(stage, seconds) from the run's status lines: `[ 3/13] score teacher ...` then `done in 12.3 s: ...`."""
    out, current = [], None
    for line in log.splitlines():
        if (m := STAGE.match(line)) is not None:
            current = m["stage"]
        elif (m := DONE.match(line)) is not None and current is not None:
            out.append((current, float(m["seconds"])))
            current = None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="clone here and keep it (default: a temporary directory)")
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    clone = args.keep or Path(tempfile.mkdtemp(prefix="miniplm-demo-")) / "miniplm"
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    subprocess.run(["git", "clone", "--quiet", str(root), str(clone)], check=True)
    try:
        started = time.time()
        subprocess.run(["make", "setup"], cwd=clone, check=True, capture_output=True)
        setup = time.time() - started
        demo = subprocess.run(["make", "demo"], cwd=clone, capture_output=True, text=True)
        total = time.time() - started
        if demo.returncode != 0:
            raise SystemExit(f"make demo failed:\n{demo.stdout[-3000:]}\n{demo.stderr[-3000:]}")
    finally:
        if args.keep is None:
            shutil.rmtree(clone.parent, ignore_errors=True)
    stages = stage_times(demo.stdout)
    print(f"`make demo` on a fresh clone of {commit}: {total:.0f} s ({total / 60:.1f} min; promise "
          f"{PROMISE_S / 60:.0f} min: {'kept' if total <= PROMISE_S else 'BROKEN'})\n")
    print("| step | seconds |\n|---|---|")
    print(f"| set-up (make setup) | {setup:.0f} |")
    for stage, seconds in stages:
        print(f"| {stage} | {seconds:.1f} |")
    print(f"| other (start-up, report table) | {total - setup - sum(s for _, s in stages):.0f} |")
    print(f"| **total** | **{total:.0f}** |")
    table = demo.stdout[demo.stdout.find(" students ("):] if " students (" in demo.stdout else ""
    print(f"\nWhat the demo printed:\n\n```\n{table.rstrip()}\n```")


if __name__ == "__main__":
    main()
