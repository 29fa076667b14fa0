"""`surgeon train` on the command line: one-line errors (exit 2), a single run, a process killed
with SIGKILL and resumed bit-exactly, and CIFAR-100 in torchvision's on-disk format."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from surgeon_cli.app import main
from torchvision import datasets

import surgeon

MLP = ["--model", "mlp", "--model-arg", "hidden=(16,)"]
SMALL = ["--limit-train", "200", "--limit-test", "100", "--batch-size", "50", "--device", "cpu"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "surgeon-cache"


@pytest.fixture(scope="module", autouse=True)
def _env(training_env):
    """The shared data cache and one torch thread (``training_env`` in conftest.py)."""


def cli(capsys, *args: str | Path) -> tuple[int, str, str]:
    rc = main(["train", *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("error: ") and ". hint: " in line, line
    return line


def step_rows(folder: Path) -> list[dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == "step"]


# --- errors: one line, exit code 2, nothing trained -------------------------------------------


def _empty_root(t: Path) -> Path:
    (t / "empty").mkdir(exist_ok=True)
    return t / "empty"


ERRORS = {
    "unknown recipe": (lambda t: ["--recipe", "no-such-recipe"], "unknown recipe 'no-such-recipe'"),
    "missing data folder": (
        lambda t: [*MLP, *SMALL, "--data", t / "no-such-folder"],
        "does not exist",
    ),
    "not an image folder": (
        lambda t: [*MLP, *SMALL, "--data", _empty_root(t)],
        "has no train/ folder",
    ),
    "cifar10 missing without --download": (
        lambda t: [*MLP, *SMALL, "--data", "cifar10", "--data-root", _empty_root(t)],
        "cifar10 not found",
    ),
    "--resume with --recipe": (lambda t: ["--resume", t, "--recipe", "quick"], "--recipe"),
    "--resume with --lr": (lambda t: ["--resume", t, "--lr", "0.1"], "cannot change lr"),
    "--resume of a non-run folder": (lambda t: ["--resume", t], "not a run folder"),
    "--dropout with a timm model": (
        lambda t: ["--model", "timm:resnet18", "--dropout", *SMALL],
        "--dropout applies to the built-in models",
    ),
    "--download with the sample": (lambda t: [*MLP, *SMALL, "--download"], "--download applies"),
    "--download with a folder": (
        lambda t: [*MLP, *SMALL, "--data", _empty_root(t), "--download"],
        "--download applies",
    ),
    "--download with a sample recipe": (
        lambda t: ["--recipe", "quick", "--download"],
        "--download applies",
    ),
    "--precision bf16 on CPU": (
        lambda t: [*MLP, *SMALL, "--precision", "bf16", "--device", "cpu"],
        "--precision bf16 needs a CUDA device",
    ),
    "--name with --recipe": (lambda t: ["--recipe", "quick", "--name", "x"], "--name"),
    "invalid --shift": (lambda t: [*MLP, "--shift", "diagonal"], "invalid --shift 'diagonal'"),
    "invalid --scale on a recipe": (
        lambda t: ["--recipe", "quick", "--scale", "pixel", "--dry-run"],
        "invalid --scale 'pixel'",
    ),
    "batch larger than the data": (
        lambda t: [*MLP, *SMALL, "--batch-size", "500"],
        "batch size 500 is larger than the 200 training images",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_line_with_exit_2(case, tmp_path, capsys):
    make, needle = ERRORS[case]
    runs = tmp_path / "runs"
    rc, out, err = cli(capsys, *make(tmp_path), "--out", runs, "--quiet")
    assert rc == 2
    line = one_line_error(err)
    assert needle in line
    assert "Traceback" not in out + err
    assert not list(tmp_path.rglob("metrics.jsonl"))  # nothing trained
    if case == "cifar10 missing without --download":
        assert "--download" in line.split(". hint: ")[1]


def test_error_from_a_real_process(cache):
    env = {**os.environ, "SURGEON_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "surgeon_cli.app", "train", "--recipe", "no-such-recipe"]
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2
    assert r.stdout == ""
    assert one_line_error(r.stderr).startswith("error: unknown recipe 'no-such-recipe'")


def test_nproc_relaunches_the_given_options(monkeypatch, capsys):
    """--nproc re-runs the command under torchrun with the options the user gave, rebuilt from
    the parsed values (no --nproc, no defaults); --nproc 1 given explicitly launches too."""
    from surgeon.train import distributed

    calls = []
    monkeypatch.setattr(distributed, "launch", lambda n, argv, **kw: calls.append((n, argv)) or 0)
    argv = [*MLP, "--lr", "0.1", "--no-dropout", "--quiet", "--out", "somewhere"]
    assert cli(capsys, *argv, "--nproc", "2")[0] == 0
    assert cli(capsys, "--nproc=1", "--epochs", "3")[0] == 0
    assert cli(capsys, "--nproc", "2", "--recipe", "quick")[0] == 2
    assert calls == [
        (2, ["train", "--model", "mlp", "--model-arg", "hidden=(16,)", "--no-dropout", "--lr",
             "0.1", "--out", "somewhere", "--quiet"]),
        (1, ["train", "--epochs", "3"]),
    ]  # fmt: skip


# --- a single run -----------------------------------------------------------------------------


def test_single_run(tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = [*MLP, *SMALL, "--epochs", "2", "--out", runs, "--name", "tiny", "--quiet"]
    rc, out, _ = cli(capsys, *argv)
    assert rc == 0
    folder = runs / "tiny"
    assert "[tiny] epoch 1/2" in out and "[tiny] epoch 2/2" in out  # plain lines name the run
    assert f"run folder: {folder}" in out and "shift-layer+scale-layer" in out
    summary = json.loads((folder / "summary.json").read_text())
    assert (summary["name"], summary["status"], summary["epochs_run"]) == ("tiny", "ok", 2)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model"] == "mlp" and cfg["model_args"] == {"hidden": [16]}
    assert (cfg["shift"], cfg["scale"], cfg["lr"], cfg["ss_lr_mult"]) == (
        "layer",
        "layer",
        0.04,
        0.1,
    )
    assert surgeon.load(folder)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    # the same command again: the folder exists
    rc, _, err = cli(capsys, *argv)
    assert rc == 2
    line = one_line_error(err)
    assert "already exists" in line and "--resume" in line
    # --resume of a finished run changes nothing, and says so
    before = (folder / "model.safetensors").read_bytes()
    rc, out, _ = cli(capsys, "--resume", folder, "--quiet")
    assert rc == 0 and "finished (2 epochs); nothing to do" in out
    assert (folder / "model.safetensors").read_bytes() == before


# --- a process killed mid-run, then resumed -----------------------------------------------------


def test_killed_process_resumes_bit_exactly(tmp_path, capsys, cache):
    """SIGKILL once a checkpoint in the second epoch exists (mid-epoch: 5 steps per epoch,
    checkpoints every 2); `--resume` then ends with the uninterrupted run's weights and metrics.
    Dropout and augmentation are on: the RNG and data-order state must come back exactly."""
    args = [
        "--model", "mlp", "--model-arg", "hidden=(32,)", "--dropout", "--augment",
        "--limit-train", "200", "--limit-test", "100", "--batch-size", "40", "--epochs", "30",
        "--checkpoint-every", "2", "--device", "cpu", "--quiet", "--name", "run",
    ]  # fmt: skip
    killed = tmp_path / "killed"
    env = {**os.environ, "SURGEON_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "surgeon_cli.app", "train", *args, "--out", str(killed)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pointer = killed / "run" / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 300
    try:
        while not (pointer.exists() and json.loads(pointer.read_text())["step"] >= 7):
            if proc.poll() is not None:
                pytest.fail(f"training exited early ({proc.returncode}): {proc.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint within 300 s")
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    run = killed / "run"
    assert not (run / "summary.json").exists(), "the run finished before the kill"
    reached = json.loads(pointer.read_text())["step"]
    assert 7 <= reached < 150

    rc, _, _ = cli(capsys, "--resume", run, "--quiet")
    assert rc == 0
    full = tmp_path / "full"
    rc, _, _ = cli(capsys, *args, "--out", full)
    assert rc == 0
    resumed, uninterrupted = (
        load_file(str(run / "model.safetensors")),
        load_file(str(full / "run" / "model.safetensors")),
    )
    assert resumed.keys() == uninterrupted.keys()
    for k in resumed:
        assert torch.equal(resumed[k], uninterrupted[k]), k
    assert step_rows(run) == step_rows(full / "run")
    assert [r["step"] for r in step_rows(run)] == list(range(1, 151))
    a, b = (json.loads((f / "summary.json").read_text()) for f in (run, full / "run"))
    assert a == b and a["status"] == "ok"


# --- CIFAR-100 in torchvision's on-disk format -------------------------------------------------


def write_pickle(path: Path, obj: object) -> str:
    """A CIFAR batch file as the python version of the dataset has it; returns its md5."""
    path.write_bytes(pickle.dumps(obj, protocol=2))
    return hashlib.md5(path.read_bytes()).hexdigest()


def tiny_cifar100(root: Path, monkeypatch) -> list[str]:
    """2 train / 1 test image per class in torchvision's layout; the md5s are these files'."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"class{i:03d}" for i in range(100)]
    files = {}
    for split, per_class in (("train", 2), ("test", 1)):
        fine = [i % 100 for i in range(100 * per_class)]
        rows = rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8)
        obj = {"data": rows, "fine_labels": fine, "coarse_labels": [f // 5 for f in fine]}
        files[split] = write_pickle(folder / split, obj)
    meta = {"fine_label_names": names, "coarse_label_names": [f"c{i}" for i in range(20)]}
    meta_md5 = write_pickle(folder / "meta", meta)
    monkeypatch.setattr(datasets.CIFAR100, "train_list", [["train", files["train"]]])
    monkeypatch.setattr(datasets.CIFAR100, "test_list", [["test", files["test"]]])
    monkeypatch.setattr(
        datasets.CIFAR100, "meta", {"filename": "meta", "key": "fine_label_names", "md5": meta_md5}
    )
    return names


def test_cifar100_one_epoch(tmp_path, monkeypatch, capsys):
    root = tmp_path / "c100"
    names = tiny_cifar100(root, monkeypatch)
    runs = tmp_path / "runs"
    argv = [*MLP, "--data", "cifar100", "--data-root", root, "--epochs", "1", "--batch-size", "50"]
    rc, _, _ = cli(capsys, *argv, "--device", "cpu", "--out", runs, "--name", "c100", "--quiet")
    assert rc == 0
    folder = runs / "c100"
    info = json.loads((folder / "data.json").read_text())
    assert (info["source"], info["classes"], info["train"], info["test"]) == (
        "cifar100",
        names,
        200,
        100,
    )
    assert json.loads((folder / "summary.json").read_text())["status"] == "ok"
    model = surgeon.load(folder)
    assert model(torch.zeros(3, 3, 32, 32)).shape == (3, 100)
    assert load_file(str(folder / "model.safetensors"))["layers.4.weight"].shape == (100, 16)
