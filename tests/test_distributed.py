"""DDP through torchrun on CPU with gloo and 2 processes (issue 6).

Each test launches real processes, so they are few: one DDP run compared with a
single-process run of the same global batch, a worker that dies, and a resume with another
world size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgeon.errors import TrainError
from surgeon.train import TrainConfig, resume, train

ARGS = [
    "--model", "mlp", "--model-arg", "hidden=(32,)", "--limit-train", "400", "--limit-test", "100",
    "--epochs", "2", "--batch-size", "40", "--quiet", "--device", "cpu",
]  # fmt: skip


def surgeon(
    *args: str, env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "surgeon", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    proc = surgeon("train", *ARGS, "--out", str(out), "--name", "ddp", "--nproc", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "ddp"


def test_ddp_matches_single_process_with_the_same_global_batch(
    ddp_run: Path, tmp_path: Path
) -> None:
    cfg = TrainConfig(
        model="mlp",
        model_args={"hidden": (32,)},
        limit_train=400,
        limit_test=100,
        epochs=2,
        batch_size=40,
        device="cpu",
    )
    train(cfg, tmp_path / "single")
    a = load_file(str(ddp_run / "model.safetensors"))
    b = load_file(str(tmp_path / "single" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    steps_a = [json.loads(x) for x in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    steps_b = [
        json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()
    ]
    la = [r["loss"] for r in steps_a if r["type"] == "step"]
    lb = [r["loss"] for r in steps_b if r["type"] == "step"]
    assert la == pytest.approx(lb, rel=1e-4, abs=1e-5)  # the logged loss is the mean over ranks


def test_rank_zero_alone_writes(ddp_run: Path) -> None:
    rows = [json.loads(x) for x in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["type"] == "step"]
    assert steps == list(range(1, 21))  # 400 images / batch 40 x 2 epochs, each logged once
    assert [r["epoch"] for r in rows if r["type"] == "epoch"] == [1, 2]
    ckpts = sorted(p.name for p in (ddp_run / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000010", "step_00000020"]
    assert json.loads((ddp_run / "config.json").read_text())["world_size"] == 2
    assert len(list(ddp_run.parent.glob(".*.tmp"))) == 0


def test_resume_with_another_world_size_fails_clearly(ddp_run: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(ddp_run, copy)
    with pytest.raises(TrainError, match="trained with 2 process"):
        resume(copy, overrides={"epochs": 3})


def test_a_dead_worker_ends_the_job_with_an_error(tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = surgeon(
        "train",
        *ARGS,
        "--out",
        str(tmp_path),
        "--name",
        "dies",
        "--nproc",
        "2",
        env={"SURGEON_FAULT": "1:3"},
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1
    assert "distributed run failed" in proc.stderr and "hint:" in proc.stderr
    assert elapsed < 200  # bounded: no hang waiting on the dead peer
