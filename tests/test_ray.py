"""Ray as the engine for many runs, and the LR search (issue 18), on a local 2-CPU Ray cluster.

One cluster for the module: a two-run grid equals the local runner bit for bit, a worker
killed mid-run is retried and ends with the weights of an uninterrupted run, and an ASHA
search with 4 trials stops at least one early. Without Ray these skip, except the test of
the one-line error that says how to install it.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgeon.train import TrainConfig, load_recipe, run_configs, train

QUICK = {"data": "sample", "epochs": 1, "limit_train": 200, "limit_test": 100, "device": "cpu"}
TINY = {
    "model": "mlp", "model_args": {"hidden": (32,)}, "data": "sample", "limit_train": 400,
    "limit_test": 100, "batch_size": 40, "augment": False, "device": "cpu",
}  # fmt: skip


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[object]:
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def test_two_run_grid_equals_the_local_runner_bit_for_bit(
    ray_cluster: object, tmp_path: Path, one_thread: None
) -> None:
    from surgeon.train.ray_backend import run_ray

    configs = load_recipe("quick").configs(QUICK)[:2]  # plain and batchnorm
    done: list[str] = []
    remote = run_ray(
        configs, tmp_path / "ray", recipe_name="quick", on_done=lambda s: done.append(s["name"])
    )
    local = run_configs(configs, tmp_path / "local", recipe_name="quick")  # one thread too
    assert sorted(done) == sorted(c.name for c in configs)
    assert [r["status"] for r in remote] == ["ok", "ok"]
    for r, lo in zip(remote, local):
        assert r["name"] == lo["name"]
        assert r["final_val_err"] == lo["final_val_err"]  # bit for bit
        a, b = _weights(tmp_path / "ray" / r["name"]), _weights(tmp_path / "local" / r["name"])
        assert all(torch.equal(a[k], b[k]) for k in a)
    table = json.loads((tmp_path / "ray" / "results.json").read_text())
    assert [r["name"] for r in table["runs"]] == [c.name for c in configs]


def test_a_killed_task_is_retried_from_its_checkpoint(
    ray_cluster: object, tmp_path: Path, one_thread: None
) -> None:
    from surgeon.train.ray_backend import run_ray

    cfg = TrainConfig(**TINY, epochs=2, checkpoint_every=3)  # 10 steps per epoch
    # the worker process dies after step 13 (checkpoint at 12), in its first attempt only
    env = {"runtime_env": {"env_vars": {"SURGEON_FAULT": "0:13"}}}
    [summary] = run_ray([cfg], tmp_path / "ray", task_options=env)
    assert summary["status"] == "ok" and summary["steps"] == 20
    log = (tmp_path / "ray" / f".{cfg.name}.log").read_text()
    assert "attempt 1" in log and "attempt 2" in log and "resumed from its last checkpoint" in log
    train(cfg, tmp_path / "plain")
    a, b = _weights(tmp_path / "ray" / cfg.name), _weights(tmp_path / "plain")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_diverging_run_is_recorded_not_retried(ray_cluster: object, tmp_path: Path) -> None:
    from surgeon.train.ray_backend import run_ray

    cfg = TrainConfig(**TINY, epochs=1, lr=1e6)
    [summary] = run_ray([cfg], tmp_path / "ray")
    assert summary["status"] == "diverged"
    log = (tmp_path / "ray" / f".{cfg.name}.log").read_text()
    assert log.count("[ray] attempt") == 1


def test_asha_search_stops_a_trial_early(ray_cluster: object, tmp_path: Path) -> None:
    from surgeon.train.tune import search_lr

    configs = [TrainConfig(**TINY, epochs=3, shift="layer", scale="layer")]
    lines: list[dict] = []
    result = search_lr(
        configs, tmp_path / "search", lr_min=1e-3, lr_max=0.5, trials=4, grace_epochs=1,
        reduction_factor=2, concurrent=1, recipe_name="tiny", on_trial=lines.append,
    )  # fmt: skip
    trials = result["variants"]["shift-layer+scale-layer"]["trials"]
    assert len(trials) == 4 and len(lines) == 4
    assert any(t["status"] == "stopped" and t["epochs"] < 3 for t in trials)
    best = json.loads((tmp_path / "search" / "best_lr.json").read_text())["best"]
    done = [t for t in trials if t["status"] == "completed"]
    assert best["shift-layer+scale-layer"]["final_val_err"] == min(t["final_val_err"] for t in done)
    curves = (tmp_path / "search" / "trials.csv").read_text().splitlines()
    assert len(curves) == 1 + sum(max(t["epochs"], 1) for t in trials)
    assert (tmp_path / "search" / "lr_search.png").stat().st_size > 0


def test_missing_ray_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from surgeon_cli.app import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    code = main(["train", "--recipe", "quick", "--backend", "ray", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ['error: --backend ray needs Ray. hint: pip install "fx-surgeon[ray]"']
    assert not any(tmp_path.iterdir())
