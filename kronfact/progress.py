"""Progress bars, one owner: :func:`progress_bar` for counted work (layers, windows, tensors) and
:func:`training_bar` for the training loop (loss, learning rate, throughput, validation)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _Rate(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        return Text("" if task.speed is None else f"{task.speed:.1f} {self.unit}/s")


@contextmanager
def progress_bar(enabled: bool, total: int, description: str, unit: str = "") -> Iterator[Callable[[float], None]]:
    """A transient bar (gone when done) of ``total`` items; with a ``unit`` it shows their rate, e.g. layers/s.
    Yields ``advance(n)`` (fractions allowed); a no-op when not ``enabled``."""
    if not enabled:
        yield lambda n: None
        return
    columns = ([TextColumn("{task.completed:.0f}/{task.total} " + unit), _Rate(unit), TimeElapsedColumn()] if unit
               else [MofNCompleteColumn(), TimeRemainingColumn()])
    with Progress(TextColumn("{task.description}"), BarColumn(), *columns, transient=True) as prog:
        task = prog.add_task(description, total=total)
        yield lambda n: prog.advance(task, n)


def training_bar(enabled: bool, total: int, start: int) -> Any:
    """The training loop's bar (a context manager; None inside when not ``enabled``): steps done of
    ``total`` from ``start``, and an ``info`` field the loop fills (loss, lr, tokens/s, validation)."""
    if not enabled:
        return nullcontext(None)
    prog = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeRemainingColumn())
    prog.add_task("train", total=total, completed=start, info="")
    return prog
