"""Online learning (batch size 1, one pass, test-then-train) on a few dozen samples: the
run folder `surgeon report` reads, what batch norm does at batch 1, replace-norm, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from surgeon_cli.app import main
from torch import nn

import surgeon
from surgeon.errors import TrainError
from surgeon.train import TrainConfig, load_recipe
from surgeon.train.online import (
    make_stream,
    normalise,
    online_model,
    parse_online_variant,
    plan,
    run_online,
    run_plan,
)
from surgeon.train.variants import build_base

STREAM, TEST = 24, 30


@pytest.fixture(scope="module", autouse=True)
def _env(training_env):
    """The shared data cache and one torch thread (``training_env`` in conftest.py)."""


def cfg(**kw) -> TrainConfig:
    base = {"model": "mlp", "model_args": {"hidden": [16]}, "batch_size": 1, "epochs": 1,
            "limit_train": STREAM, "limit_test": TEST, "lr": 0.01, "momentum": 0.0,
            "augment": False, "device": "cpu"}  # fmt: skip
    return TrainConfig.from_dict({**base, **kw})


def rows(run) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["type"] == "step"], [r for r in lines if r["type"] == "epoch"]


def test_plain_run_folder(tmp_path):
    c = cfg()
    s = run_online(c, tmp_path / "run", "plain")
    assert s["status"] == "ok" and s["samples"] == STREAM
    steps, epochs = rows(tmp_path / "run")
    assert [r["step"] for r in steps] == list(range(1, STREAM + 1))
    assert {"loss", "ema_loss", "lr", "online_acc", "online_acc_window"} <= set(steps[0])
    assert steps[-1]["online_acc"] == pytest.approx(s["online_acc"])
    (end,) = epochs
    assert end["val_err"] == pytest.approx(1 - s["test_acc"])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["online"]["stream"] == STREAM
    back = surgeon.load(tmp_path / "run")  # the final model, as surgeon.load reads it
    assert isinstance(back, nn.Module)


def test_prediction_comes_before_training(tmp_path):
    """Step 1's accuracy is the untrained model's prediction on the first streamed sample."""
    c = cfg(seed=3)
    data = surgeon.data.load_data("sample", limit_test=TEST)
    stream = make_stream(data, STREAM, c.seed)
    size = tuple(data.train_x.shape[1:])
    base = build_base(c, data.num_classes, size)
    model = online_model(base, parse_online_variant("plain"), size, bn_inserted=False)
    with torch.no_grad():
        first = int(model.eval()(stream.x[:1]).argmax(1).item() == int(stream.y[0]))
    run_online(c, tmp_path / "run", "plain", stream=stream, base=base)
    steps, _ = rows(tmp_path / "run")
    assert steps[0]["online_acc"] == first
    # one pass in a fixed order: the stream is the seeded permutation's head, normalised
    order = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(3))
    assert torch.equal(stream.x, normalise(data.train_x[order[:STREAM]], data))


def test_batchnorm1d_at_batch_one_fails_and_says_why(tmp_path):
    s = run_online(cfg(), tmp_path / "bn", "batchnorm")
    assert s["status"] == "failed" and s["samples"] == 0
    assert "Expected more than 1 value per channel when training" in s["message"]
    assert json.loads((tmp_path / "bn" / "summary.json").read_text())["status"] == "failed"


def test_batchnorm2d_trains_on_per_sample_statistics(tmp_path):
    c = cfg(model="allconv", model_args={"width": 0.05})
    s = run_online(c, tmp_path / "bn2d", "batchnorm")
    assert s["status"] == "ok" and s["samples"] == STREAM
    assert 0.0 <= s["test_acc_train_mode_b1"] <= 1.0  # the batch-1 train-mode forward, reported


def test_replace_norm_and_frozen_variants(tmp_path):
    runs = [(cfg(), parse_online_variant(v)) for v in ("replace-norm", "batchnorm-frozen")]
    results = run_plan(runs, tmp_path / "p", recipe_name="t")
    assert [r["status"] for r in results] == ["ok", "ok"]
    back = surgeon.load(tmp_path / "p" / "replace-norm_lr0.01_s0")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in back.modules())
    assert json.loads((tmp_path / "p" / "results.json").read_text())["recipe"] == "t"


def test_warm_start_continues_from_a_pretrained_batchnorm_model(tmp_path):
    runs = plan(load_recipe("online"), {"model": "mlp", "model_args": {"hidden": [8]},
                "limit_train": STREAM, "limit_test": TEST}, warm_start=1)  # fmt: skip
    assert [v.name for _, v in runs] == ["batchnorm", "batchnorm-frozen", "replace-norm"]
    results = run_plan(runs[1:], tmp_path / "w", warm_start=1)
    assert all(r["status"] == "ok" and r["warm_start_test_acc"] is not None for r in results)


def test_online_needs_batch_one():
    with pytest.raises(TrainError, match="batch size 1"):
        plan(load_recipe("quick"))
    with pytest.raises(TrainError, match="unknown online variant"):
        parse_online_variant("groupnorm")


def test_recipe_plan_adds_replace_norm():
    names = [v.name for _, v in plan(load_recipe("online"))]
    assert names[:2] == ["plain", "batchnorm"] and "replace-norm" in names
    assert "shift-layer+scale-layer" in names


def test_cli_online_and_report(tmp_path, capsys):
    code = main(["online", "--model", "mlp", "--model-arg", "hidden=[8]", "--stream", str(STREAM),
                 "--limit-test", str(TEST), "--variant", "plain", "--variant", "batchnorm",
                 "--variant", "shift-layer+scale-layer", "--out", str(tmp_path)])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "Expected more than 1 value per channel" in text
    results = json.loads((tmp_path / "online" / "results.json").read_text())
    assert [r["status"] for r in results["runs"]] == ["ok", "failed", "ok"]
    assert main(["report", str(tmp_path / "online"), "-o", str(tmp_path / "rep")]) == 0
    assert list((tmp_path / "rep").glob("online_*.png"))
    capsys.readouterr()
    assert main(["online", "--recipe", "quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hint:" in err


def test_loss_is_cross_entropy_of_the_prediction(tmp_path):
    """The logged loss is the loss of the same forward that made the prediction."""
    c = cfg(lr=1e-9)  # the weights barely move: every step's loss is the init's
    data = surgeon.data.load_data("sample", limit_test=TEST)
    stream = make_stream(data, 4, c.seed)
    size = tuple(data.train_x.shape[1:])
    base = build_base(c, data.num_classes, size)
    run_online(c, tmp_path / "r", "plain", stream=stream, base=base)
    steps, _ = rows(tmp_path / "r")
    with torch.no_grad():
        want = F.cross_entropy(base(stream.x), stream.y, reduction="none")
    assert [r["loss"] for r in steps] == pytest.approx(want.tolist(), rel=1e-4)
