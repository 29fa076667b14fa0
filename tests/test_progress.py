"""Progress: piped or --quiet, a line at most every few seconds within an epoch; the rich
bars end full."""

from __future__ import annotations

import io

from rich.console import Console

from surgeon.train import progress


def _plain(every_s: float) -> tuple[progress.PlainReporter, io.StringIO]:
    out = io.StringIO()
    return progress.PlainReporter(Console(file=out, width=200), every_s=every_s), out


def test_plain_lines_within_an_epoch(monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    rep, out = _plain(10.0)
    rep.start("run", epochs=2, steps_per_epoch=50, images_per_step=128)
    rep.step(5, 2.3, 0.04)  # 0 s later: nothing
    now[0] += 10.5
    rep.step(21, 2.1, 0.04)  # 21 steps in 10.5 s: 2 steps/s = 256 img/s, 79 steps left
    now[0] += 3
    rep.step(27, 2.0, 0.04)  # within 10 s of the last line: nothing
    lines = out.getvalue().splitlines()
    assert lines == ["[run] step 21/100 ema_loss 2.1000 lr 0.04 256 img/s eta 0:40"]


def test_the_rich_steps_bar_ends_full() -> None:
    rep = progress.RichReporter(Console(file=io.StringIO(), width=120))
    rep.start("run", epochs=1, steps_per_epoch=23, images_per_step=8)
    row = {"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "val_acc": 0.5, "images_per_s": 9.0}
    rep.epoch(row)
    task = rep.progress.tasks[rep.t_steps]
    assert task.completed == task.total == 23
    rep.stop()
