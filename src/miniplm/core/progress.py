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


class progress:
    """`with progress(enabled, total, label, unit) as advance: advance(n)`; a no-op when disabled.

    unit "bytes" shows sizes and MB/s; any other unit shows counts and `<unit>/s`.
    """

    def __init__(self, enabled: bool, total: int, label: str, unit: str = "tokens"):
        self.enabled, self.total, self.label, self.unit = enabled, total, label, unit

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        if self.unit == "bytes":
            columns = [DownloadColumn(), TransferSpeedColumn()]
        else:
            columns = [MofNCompleteColumn(), TextColumn(self.unit), TextColumn("{task.fields[rate]}")]
        self.bar = Progress(TextColumn(self.label), BarColumn(), *columns, TimeElapsedColumn(), TextColumn("ETA"),
                            TimeRemainingColumn())
        self.bar.start()
        self.task = self.bar.add_task(self.label, total=self.total, rate="")
        return self._advance

    def _advance(self, n: int) -> None:
        self.bar.advance(self.task, n)
        if self.unit != "bytes":
            speed = self.bar.tasks[0].speed
            self.bar.update(self.task, rate=f"{speed:,.0f} {self.unit}/s" if speed else "")

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()
        return False
