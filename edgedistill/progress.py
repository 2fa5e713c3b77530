"""Progress display for long stages (rich), quiet when not attached to a terminal."""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


class _Bar:
    def __init__(self, progress: Progress | None, task, total: int, label: str):
        self.progress, self.task, self.total, self.label = progress, task, total, label
        self.done = 0

    def set_total(self, total: int) -> None:
        """The amount of work turned out different from the first estimate."""
        self.total = total
        if self.progress is not None:
            self.progress.update(self.task, total=total)

    def advance(self, **fields: str) -> None:
        self.done += 1
        info = " ".join(f"{k}={v}" for k, v in fields.items())
        if self.progress is not None:
            self.progress.update(self.task, advance=1, info=info)
        elif self.done == self.total or self.done % max(1, self.total // 10) == 0:
            print(f"  {self.label}: {self.done}/{self.total} {info}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def progress_bar(label: str, total: int) -> Iterator[_Bar]:
    if not console.is_terminal:
        yield _Bar(None, None, total, label)
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console, transient=False) as p:
        task = p.add_task(label, total=total, info="")
        yield _Bar(p, task, total, label)
