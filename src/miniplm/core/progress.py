"""One progress bar for every long stage: done/total in the stage's unit, its rate, elapsed time and ETA."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


def rate_text(speed: float | None, unit: str) -> str:
    """`1,234 tokens/s`, `2.5 steps/s`, or below one unit a second `4.0 s/step` (never a rounded `0 steps/s`)."""
    if not speed:
        return ""
    if speed >= 100:
        return f"{speed:,.0f} {unit}/s"
    if speed >= 1:
        return f"{speed:.1f} {unit}/s"
    return f"{1 / speed:.1f} s/{unit.removesuffix('s')}"


class progress:
    """`with progress(enabled, total, label, unit) as advance: advance(n)`; a no-op when disabled.

    unit "bytes" shows sizes and MB/s; any other unit shows counts and `<unit>/s`. `done`: units finished
    before this process started (a resumed run), shown on the bar but not counted in its rate. `console` and
    `clock` are rich's (a recorded console, a fake clock in tests).
    """

    def __init__(self, enabled: bool, total: int, label: str, unit: str = "tokens", done: int = 0, console=None,
                 clock=None):
        self.enabled, self.total, self.label, self.unit, self.done = enabled, total, label, unit, done
        self.console, self.clock = console, clock

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        if self.unit == "bytes":
            columns = [DownloadColumn(), TransferSpeedColumn()]
        else:
            columns = [MofNCompleteColumn(), TextColumn(self.unit), TextColumn("{task.fields[rate]}")]
        self.bar = Progress(TextColumn(self.label), BarColumn(), *columns, TimeElapsedColumn(), TextColumn("ETA"),
                            TimeRemainingColumn(), console=self.console, get_time=self.clock)
        self.bar.start()
        self.task = self.bar.add_task(self.label, total=self.total, completed=self.done, rate="")
        return self._advance

    def _advance(self, n: int) -> None:
        self.bar.advance(self.task, n)
        if self.unit != "bytes":
            self.bar.update(self.task, rate=rate_text(self.bar.tasks[0].speed, self.unit))

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()
        return False
