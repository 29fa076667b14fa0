"""Progress display: a rich live view on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class Reporter:
    """Receives training events; the base class prints nothing."""

    def start(
        self,
        name: str,
        epochs: int,
        steps_per_epoch: int,
        start_epoch: int = 0,
        start_step: int = 0,
    ) -> None: ...
    def step(self, step: int, ema_loss: float, lr: float) -> None: ...
    def epoch(self, row: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def stop(self) -> None: ...


class PlainReporter(Reporter):
    """One line per epoch (``--quiet`` or stdout not a terminal)."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(highlight=False, width=160)
        self.name, self.epochs = "", 0

    def start(
        self,
        name: str,
        epochs: int,
        steps_per_epoch: int,
        start_epoch: int = 0,
        start_step: int = 0,
    ) -> None:
        self.name, self.epochs = name, epochs

    def epoch(self, row: dict[str, Any]) -> None:
        self.console.print(
            f"{escape(f'[{self.name}]')} epoch {row['epoch']}/{self.epochs} train_loss {row['train_loss']:.4f} "
            f"ema_loss {row['ema_loss']:.4f} val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.4f} "
            f"{row['images_per_s']:.0f} img/s {row['time_s']:.1f}s"
        )

    def message(self, text: str) -> None:
        self.console.print(f"{escape(f'[{self.name}]')} {text}", soft_wrap=True)  # one line


class RichReporter(PlainReporter):
    """Epoch and step bars with live EMA loss, val accuracy, images/s and ETA."""

    def __init__(self, console: Console | None = None, refresh_s: float = 0.25) -> None:
        super().__init__(console or Console())
        self.refresh_s, self._last = refresh_s, 0.0
        self.progress: Progress | None = None

    def start(
        self,
        name: str,
        epochs: int,
        steps_per_epoch: int,
        start_epoch: int = 0,
        start_step: int = 0,
    ) -> None:
        super().start(name, epochs, steps_per_epoch)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console,
            transient=False, refresh_per_second=4,
        )  # fmt: skip
        self.progress.start()
        self.t_epochs = self.progress.add_task(
            f"{name} epochs", total=epochs, completed=start_epoch, info=""
        )
        self.t_steps = self.progress.add_task(
            "steps", total=steps_per_epoch, completed=start_step % max(steps_per_epoch, 1), info=""
        )
        self.steps_per_epoch = steps_per_epoch

    def step(self, step: int, ema_loss: float, lr: float) -> None:
        now = time.monotonic()
        if self.progress is None or now - self._last < self.refresh_s:
            return
        self._last = now
        done = step % self.steps_per_epoch or self.steps_per_epoch
        self.progress.update(
            self.t_steps, completed=done, info=f"ema_loss {ema_loss:.4f} lr {lr:.3g}"
        )

    def epoch(self, row: dict[str, Any]) -> None:
        if self.progress is None:
            return super().epoch(row)
        self.progress.update(self.t_steps, completed=0)
        self.progress.update(
            self.t_epochs,
            completed=row["epoch"],
            info=f"val_acc {row['val_acc']:.4f} {row['images_per_s']:.0f} img/s",
        )
        self.progress.console.print(
            f"epoch {row['epoch']}/{self.epochs}: train_loss {row['train_loss']:.4f} val_loss "
            f"{row['val_loss']:.4f} val_acc {row['val_acc']:.4f} ({row['images_per_s']:.0f} img/s)"
        )

    def message(self, text: str) -> None:
        (self.progress.console if self.progress else self.console).print(text, soft_wrap=True)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def make_reporter(quiet: bool) -> Reporter:
    """Rich on a terminal, plain lines with ``--quiet`` or when stdout is not a terminal."""
    if quiet or not sys.stdout.isatty():
        return PlainReporter()
    return RichReporter()
