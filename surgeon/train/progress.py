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
        images_per_step: int = 0,
    ) -> None: ...
    def step(self, step: int, ema_loss: float, lr: float) -> None: ...
    def epoch(self, row: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def stop(self) -> None: ...


class PlainReporter(Reporter):
    """One line per epoch, and within an epoch a line at most every ``every_s`` seconds
    with the step, the EMA loss, images/s and the time left (``--quiet``, or stdout not a
    terminal: nothing stays silent for long)."""

    def __init__(self, console: Console | None = None, every_s: float = 10.0) -> None:
        self.console = console or Console(highlight=False, width=160)
        self.name, self.epochs, self.every_s = "", 0, every_s
        self.total = self.images_per_step = 0
        self._mark: tuple[float, int] | None = None

    def start(
        self,
        name: str,
        epochs: int,
        steps_per_epoch: int,
        start_epoch: int = 0,
        start_step: int = 0,
        images_per_step: int = 0,
    ) -> None:
        self.name, self.epochs = name, epochs
        self.total, self.images_per_step = epochs * steps_per_epoch, images_per_step
        self._mark = (time.monotonic(), start_step)

    def step(self, step: int, ema_loss: float, lr: float) -> None:
        if self._mark is None:
            return
        now = time.monotonic()
        t0, s0 = self._mark
        if now - t0 < self.every_s or step <= s0:
            return
        rate = (step - s0) / (now - t0)  # steps/s since the last line
        self._mark = (now, step)
        left = (self.total - step) / rate if rate > 0 and self.total else float("nan")
        speed = (
            f"{rate * self.images_per_step:.0f} img/s"
            if self.images_per_step
            else f"{rate:.2f} steps/s"
        )
        self.console.print(
            f"{escape(f'[{self.name}]')} step {step}/{self.total} ema_loss {ema_loss:.4f} "
            f"lr {lr:.3g} {speed} eta {_duration(left)}"
        )

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
        images_per_step: int = 0,
    ) -> None:
        super().start(name, epochs, steps_per_epoch, start_epoch, start_step, images_per_step)
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
        last = row["epoch"] >= self.epochs  # the bar ends full, not at 0 of N drawn full
        self.progress.update(self.t_steps, completed=self.steps_per_epoch if last else 0)
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


def _duration(seconds: float) -> str:
    if seconds != seconds or seconds < 0:  # nan: no rate yet
        return "?"
    m, s = divmod(int(seconds + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def make_reporter(quiet: bool) -> Reporter:
    """Rich on a terminal, plain lines with ``--quiet`` or when stdout is not a terminal."""
    if quiet or not sys.stdout.isatty():
        return PlainReporter()
    return RichReporter()
