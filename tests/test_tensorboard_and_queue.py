"""TensorBoard event files (optional package) and the parallel run queue (--workers)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from surgeon.train import TrainConfig, train
from surgeon.train.queue import run_parallel, slots

TINY = {
    "model": "mlp",
    "model_args": {"hidden": (16,)},
    "limit_train": 100,
    "limit_test": 50,
    "epochs": 1,
    "batch_size": 50,
    "device": "cpu",
}


def test_tensorboard_scalars_when_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, float, int]] = []

    class Writer:
        def __init__(self, logdir: str) -> None:
            self.logdir = logdir

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            calls.append((tag, value, step))

        def flush(self) -> None:
            pass

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    train(TrainConfig(**TINY, tensorboard=True), tmp_path / "run")
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if r["type"] == "step"]
    assert [v for t, v, _ in calls if t == "train/loss"] == losses
    assert ("epoch/val_acc", next(r["val_acc"] for r in steps if r["type"] == "epoch"), 1) in calls


def test_tensorboard_missing_warns_and_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.warns(UserWarning, match="tensorboard package is not installed"):
        summary = train(TrainConfig(**TINY, tensorboard=True), tmp_path / "run")
    assert summary["status"] == "ok"


def test_queue_runs_two_at_a_time_and_a_failure_does_not_stop_the_others(tmp_path: Path) -> None:
    good = TrainConfig(**TINY)
    bad = TrainConfig(**{**TINY, "data": str(tmp_path / "no-such-folder")}, name="bad")
    done: list[str] = []
    results = run_parallel(
        [good, bad],
        tmp_path / "q",
        slots(None, 1, 2),
        recipe_name="q",
        on_done=lambda s: done.append(s["name"]),
        poll_s=0.2,
    )
    assert [r["status"] for r in results] == ["ok", "failed"]
    assert "no-such-folder" in results[1]["message"]
    assert sorted(done) == sorted([good.name, "bad"])
    table = json.loads((tmp_path / "q" / "results.json").read_text())
    assert [r["name"] for r in table["runs"]] == [good.name, "bad"]
    assert (tmp_path / "q" / good.name / "model.safetensors").is_file()


def test_gpu_slots_pin_one_gpu_each() -> None:
    envs = slots([0, 3], runs_per_gpu=2, workers=1)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "0", "3", "3"]
