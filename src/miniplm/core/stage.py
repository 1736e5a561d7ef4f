"""The stage executor: one place that hashes, skips, locks, stages and records every stage's output.

A stage is its typed config plus an algorithm (`Stage.run`) that writes files into a directory; the
executor does the rest, the same way for every stage:

    key       sha256 of (stage name, version, the config's hashed fields, the identity of its inputs)
    skip      when `<output>/manifest.json` holds that key (and the stage finds its files intact)
    --force   redo the stage whatever the manifest says (in-place stages drop their partial work too)
    lock      `<output>.lock` while the stage runs, so two processes never write one directory
    output    staged: written into `<output>.partial` and swapped into place whole, or
              in place: parts or checkpoints kept across a kill while `plan.json` holds the same key
    manifest  written last: the key, config, inputs, versions, wall time, and the stage's own facts

Under torchrun every rank runs `Stage.run` (it splits the work by rank); rank 0 alone locks, resets and
writes the manifest. A requested stop (`core.stop`) unwinds a stage at its next unit boundary: a staged
output is dropped, an in-place one keeps its finished parts or checkpoints for the rerun.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from miniplm.core import distributed, stop
from miniplm.core.config import config_hash, to_dict
from miniplm.core.manifest import (
    MANIFEST,
    PLAN,
    manifest_key,
    new_manifest,
    output_lock,
    read_manifest,
    read_plan,
    reset_in_place,
    staged_output,
    write_json_atomic,
)
from miniplm.core.models import resolve_device


class Stage:
    """One pipeline stage: subclasses set `name` and `config` and write `run` (and `inputs`, `summary`)."""

    name: ClassVar[str]
    config: ClassVar[type]
    version: ClassVar[int] = 1  # bump when the output's layout or the algorithm changes
    in_place: ClassVar[bool] = False  # resumable in place (parts, checkpoints) instead of staged whole

    def inputs(self, config, log) -> dict[str, Any]:
        """The identity of everything the stage reads besides its config (content hashes, upstream keys)."""
        return {}

    def run(self, config, output: Path, inputs: dict[str, Any], log) -> dict[str, Any]:
        """Write the stage's files into `output`; return the facts its manifest records."""
        raise NotImplementedError

    def intact(self, output: Path, manifest: dict) -> bool:
        """Whether a finished output still holds all its files (checked before it is reused)."""
        return True

    def summary(self, manifest: dict) -> str:
        """One line for people: what the output holds."""
        return f"{self.name}: {manifest['output']}"


@dataclass
class StageResult:
    stage: str
    output: Path
    manifest: dict  # empty on ranks other than 0
    ran: bool  # False: the output was up to date and reused
    summary: str


def stage_key(stage: Stage, config, inputs: dict) -> str:
    return manifest_key(stage.name, stage.version, config_hash(config), inputs)


def execute(stage: Stage, config, force: bool = False, log=print) -> StageResult:
    """Run `stage` with `config` into `config.output`, or reuse what is there when it is up to date."""
    stop.check()  # a stop requested during the previous stage of a pipeline: start no other
    rank, world, local_rank = distributed.rank_world()
    joins = world > 1 and not distributed.initialized()  # a stage run inside another's keeps the outer group
    if joins:  # ranks meet at barriers below: join the process group on this rank's device
        distributed.init(resolve_device(getattr(config, "device", "auto"), local_rank))
    try:
        with output_lock(config.output) if rank == 0 else contextlib.nullcontext():
            return _execute(stage, config, force, log, rank)
    finally:
        if joins:
            distributed.finish()


def _execute(stage: Stage, config, force: bool, log, rank: int) -> StageResult:
    output = Path(config.output)
    inputs = stage.inputs(config, log if rank == 0 else _silent)
    key = stage_key(stage, config, inputs)
    found = read_manifest(output)
    if not force and found is not None and found.get("key") == key:
        if stage.intact(output, found):
            return StageResult(stage.name, output, found, False, stage.summary(found))
        if rank == 0:
            log(f"{stage.name}: {output} is missing files (deleted or damaged since it finished): redoing it")
    if rank == 0:
        _refuse_foreign(output)
    started = time.time()
    if not stage.in_place:
        with staged_output(output) as partial:
            facts = stage.run(config, partial, inputs, log)
            manifest = _manifest(stage, config, key, inputs, facts, started)
            write_json_atomic(partial / MANIFEST, manifest)
        return StageResult(stage.name, output, manifest, True, stage.summary(manifest))
    if rank == 0:
        reset_in_place(output, key, force, log)
    distributed.barrier()
    facts = stage.run(config, output, inputs, log if rank == 0 else _silent)
    distributed.barrier()
    manifest = {}
    if rank == 0:  # wall time over every attempt at this output, the interrupted ones included
        plan = read_plan(output) or {}
        started -= plan.get("seconds_before", 0.0)
        facts = {**facts, "attempts": plan.get("attempts", 1)}
        manifest = _manifest(stage, config, key, inputs, facts, started)
        write_json_atomic(output / MANIFEST, manifest)
    distributed.barrier()
    return StageResult(stage.name, output, manifest, True, stage.summary(manifest) if manifest else "")


def _manifest(stage: Stage, config, key: str, inputs: dict, facts: dict, started: float) -> dict:
    return new_manifest(stage.name, key, to_dict(config), output=str(config.output), config_hash=config_hash(config),
                        format_version=stage.version, inputs=inputs, **facts,
                        wall_seconds=round(time.time() - started, 2))


def _refuse_foreign(output: Path) -> None:
    """Never replace a directory that miniplm did not write (a mistyped --output pointing at one's data)."""
    if output.is_dir() and any(output.iterdir()) and not (output / MANIFEST).is_file() \
            and not (output / PLAN).is_file():
        raise FileExistsError(f"{output} exists and is not a miniplm output (no {MANIFEST} or {PLAN}); choose "
                              f"another output directory, or delete it first")


def _silent(message: str) -> None:
    """The log of ranks other than 0: one voice in the output."""
