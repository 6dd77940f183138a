"""One progress bar for the phases a user waits on that count items (pre-flight rows, evaluation answers):
done/total, rate, time left, on stderr so stdout carries only results (`predict` answers, `eval` JSON)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any


class CountBar:
    """A rich bar counting `unit`s with their rate; `advance(n)` after each piece of work, `stop()` at the end."""

    def __init__(self, label: str, total: int, unit: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.unit = unit
        self.progress = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.t0 = time.perf_counter()
        self.done = 0
        self.task = self.progress.add_task(label, total=total, rate="")
        self.progress.start()

    def advance(self, n: int = 1) -> None:
        self.done += n
        rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
        self.progress.update(self.task, advance=n, rate=f"{rate:.2f} {self.unit}/s")

    def stop(self) -> None:
        self.progress.stop()


def count_bar(label: str | None, total: int, unit: str) -> CountBar | None:
    """A CountBar, or None when no label is given (progress off) or there is nothing to count."""
    return CountBar(label, total, unit) if label and total else None


def track(items: Iterable[Any], total: int, label: str | None, unit: str) -> Iterator[Any]:
    """items, advancing a CountBar after each one (just items when label is None)."""
    bar = count_bar(label, total, unit)
    try:
        for item in items:
            yield item
            if bar is not None:
                bar.advance()
    finally:
        if bar is not None:
            bar.stop()
