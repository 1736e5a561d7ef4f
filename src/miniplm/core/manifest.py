"""Stage manifests: what an output was made from, so a rerun skips done work and never reuses stale output.

A stage writes everything into `<output>.partial/`, then writes `manifest.json` there and swaps the
directory into place. An output directory therefore either holds a complete result with its manifest or
does not exist; a killed run leaves only `.partial`, which the next run deletes. The manifest's `key`
hashes everything that determines the output (config, input content hashes, tokenizer, format version);
the stage is skipped only when the key matches.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path

MANIFEST = "manifest.json"
PLAN = "plan.json"  # the key of an in-place stage's output while it is being written
_VERSIONED = ("miniplm", "numpy", "pyarrow", "tokenizers", "transformers", "torch")


def package_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def manifest_key(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict | None:
    """A JSON file's content, or None when it is absent or damaged (an output that cannot be trusted: redo it)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def read_manifest(output: str | Path) -> dict | None:
    return _read_json(Path(output) / MANIFEST)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def staged_output(output: str | Path):
    """Yield a fresh `<output>.partial` directory; on success it replaces `output` whole."""
    output = Path(output)
    partial = output.with_name(output.name + ".partial")
    old = output.with_name(output.name + ".old")
    for leftover in (partial, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if output.exists():
        os.replace(output, old)
    os.replace(partial, output)
    shutil.rmtree(old, ignore_errors=True)


class OutputBusy(RuntimeError):
    """Another process holds the lock of an output directory."""


@contextlib.contextmanager
def output_lock(output: str | Path):
    """Hold an exclusive lock on `output` (the file `<output>.lock`) while a stage writes it, so that a second
    run pointed at the same directory stops with a clear error instead of interleaving its writes. The lock
    is the kernel's (flock): a killed holder releases it, and no stale lock survives a crash."""
    output = Path(output).resolve()
    lock_path = output.with_name(output.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fh = open(lock_path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise OutputBusy(f"{output} is being written by {holder}; wait for it to finish, or choose another "
                             f"output directory") from None
        # the holder before us may have removed the file after we opened it: then lock the new one
        if lock_path.exists() and os.fstat(fh.fileno()).st_ino == os.stat(lock_path).st_ino:
            break
        fh.close()
    fh.seek(0)
    fh.truncate()
    fh.write(f"miniplm pid {os.getpid()} on {platform.node()}")
    fh.flush()
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def new_manifest(stage: str, key: str, config: dict, **fields) -> dict:
    return {
        "stage": stage,
        "key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": package_versions(),
        "config": config,
        **fields,
    }


def part_path(output: str | Path, part: int) -> Path:
    """Where part `part` of a resumable stage lives (written under .tmp, then renamed)."""
    return Path(output) / "parts" / f"part-{part:06d}.parquet"


def open_parts(output: str | Path) -> Path:
    """The parts directory of an in-place stage, cleared of the temporary files of a killed writer."""
    parts = Path(output) / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    for leftover in parts.glob("*.tmp"):
        leftover.unlink()
    return parts


def read_plan(output: str | Path) -> dict | None:
    """The plan of an in-place stage's output (its key, and what the stage added): None when absent or damaged."""
    return _read_json(Path(output) / PLAN)


def update_plan(output: str | Path, **fields) -> None:
    """Add facts to the plan (the number of parts, say) for readers of an unfinished output."""
    write_json_atomic(Path(output) / PLAN, {**(read_plan(output) or {}), **fields})


def reset_in_place(output: str | Path, key: str, force: bool, log) -> None:
    """Ready `output` for a stage that resumes in place (parts, checkpoints).

    What an interrupted run with the same key left is kept; anything else there (another config, model or
    corpus, or --force) is removed. A stale manifest is deleted, and `plan.json` records the key so that
    the next run can tell.
    """
    output = Path(output)
    plan = read_plan(output) or {}
    same = plan.get("key") == key
    if output.exists() and (force or not same):
        if any(output.iterdir()):
            reason = "--force" if force and same else "another run's output (a changed config or input)"
            log(f"{output} holds {reason}: removing it")
        shutil.rmtree(output)
        plan = {}
    output.mkdir(parents=True, exist_ok=True)
    (output / MANIFEST).unlink(missing_ok=True)
    # the time of the interrupted attempts, each counted up to its last write (a kill leaves no end time)
    seconds = plan.get("seconds_before", 0.0)
    if "started" in plan:
        last_write = max((f.stat().st_mtime for f in output.rglob("*") if f.is_file() and f.name != PLAN),
                         default=plan["started"])
        seconds += max(0.0, last_write - plan["started"])
    write_json_atomic(output / PLAN, {"key": key, "started": time.time(), "seconds_before": round(seconds, 2),
                                      "attempts": plan.get("attempts", 0) + 1})
