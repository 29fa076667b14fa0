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


QUEUE_SCRIPT = """
import sys
from pathlib import Path
from surgeon.train import TrainConfig
from surgeon.train.queue import run_parallel, slots

tiny = dict(model="mlp", model_args={"hidden": (16,)}, limit_train=100, limit_test=50,
            epochs=100000, batch_size=50, device="cpu")
configs = [TrainConfig(**tiny, name="a"), TrainConfig(**tiny, name="b")]
run_parallel(configs, Path(sys.argv[1]), slots(None, 1, 2), poll_s=0.2)
"""


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # the parent pid
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_queue_stops_its_children_and_removes_its_folder_on_sigint(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import time

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    parent = subprocess.Popen(
        [sys.executable, "-c", QUEUE_SCRIPT, str(tmp_path / "q")],
        env={**os.environ, "TMPDIR": str(tmpdir)},
    )
    try:
        deadline = time.monotonic() + 60
        kids: list[int] = []
        while time.monotonic() < deadline and len(kids) < 2:  # both runs started
            time.sleep(0.2)
            kids = _children(parent.pid)
        assert len(kids) == 2 and list(tmpdir.glob("surgeon-queue-*"))
        time.sleep(2)  # the children are importing torch or training
        parent.send_signal(signal.SIGINT)
        assert parent.wait(timeout=60) != 0
    finally:
        parent.kill()
    assert not [k for k in kids if Path(f"/proc/{k}").exists()]  # none survives (or is a zombie)
    assert not list(tmpdir.glob("surgeon-queue-*"))
