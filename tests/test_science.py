"""The science options: the validation hold-out, model selection on it, data order, the
bias-corrected EMA, the shift/scale-only warm-up, dataset class checks (CIFAR-100 in both
forms, from small generated files) and the thesis recipes' dry-run. Tiny runs on the sample."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from surgeon_cli.app import main

from surgeon.data import Loader, load_data
from surgeon.data.sources import val_split
from surgeon.errors import DataError, TrainError
from surgeon.train import TrainConfig, Trainer, load_recipe, run_configs
from surgeon.train.engine import ema_update, ema_value, ss_warmup
from surgeon.train.optim import build_optimizer, lr_factor, set_lr


@pytest.fixture(scope="module", autouse=True)
def _env(training_env):
    """The shared data cache and one torch thread (``training_env`` in conftest.py)."""


def mlp(**kw) -> TrainConfig:
    base = {
        "model": "mlp", "model_args": {"hidden": (16,)}, "data": "sample", "limit_train": 200,
        "limit_test": 100, "epochs": 2, "batch_size": 50, "device": "cpu",
    }  # fmt: skip
    return TrainConfig(**{**base, **kw})


# ---------------------------------------------------------------- the validation hold-out


def test_val_split_is_class_balanced_seeded_and_disjoint():
    y = torch.arange(10).repeat_interleave(30)
    keep, val = val_split(y, 47, seed=3)
    assert len(val) == 47 and len(keep) == 300 - 47
    assert not set(keep.tolist()) & set(val.tolist())
    counts = torch.bincount(y[val], minlength=10).tolist()
    assert counts == [5] * 7 + [4] * 3  # 47 // 10 each, the first 47 % 10 classes one more
    again = val_split(y, 47, seed=3)[1]
    other = val_split(y, 47, seed=4)[1]
    assert torch.equal(val, again) and not torch.equal(val, other)
    with pytest.raises(DataError, match="must be between"):
        val_split(y, 300)
    with pytest.raises(DataError, match="which has"):
        val_split(torch.tensor([0, 0, 0, 1]), 2)  # class 1 would give its only image


def test_load_data_holds_out_before_the_subset():
    full = load_data("sample")
    data = load_data("sample", limit_train=200, val_size=100, limit_test=50)
    assert len(data.train_y) == 200 and len(data.val_y) == 100 and len(data.test_y) == 50
    assert torch.bincount(data.val_y).tolist() == [10] * 10
    rows = {tuple(x.flatten()[:64].tolist()) for x in data.train_x}
    assert not rows & {tuple(x.flatten()[:64].tolist()) for x in data.val_x}
    assert data.val_seed == 0 and full.val_x is None and not full.has_val


def test_best_is_chosen_on_val_and_test_reported_at_it(tmp_path):
    summary = Trainer(mlp(val_size=100, epochs=3), tmp_path / "r").run()
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["type"] == "epoch"]
    assert {r["select_split"] for r in epochs} == {"val"}
    vals, tests = [r["val_err"] for r in epochs], [r["test_err"] for r in epochs]
    best = min(range(3), key=lambda i: vals[i])
    assert summary["selected_on"] == "val"
    assert summary["best_val_err"] == vals[best] and summary["best_epoch"] == best + 1
    assert summary["test_err_at_best"] == tests[best]
    assert summary["final_test_err"] == tests[-1] and summary["final_val_err"] == vals[-1]
    info = json.loads((tmp_path / "r" / "data.json").read_text())
    assert (info["val"], info["val_seed"]) == (100, 0)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["val_size"] == 100


def test_without_a_hold_out_selection_is_on_test_as_before(tmp_path):
    summary = Trainer(mlp(), tmp_path / "r").run()
    assert summary["selected_on"] == "test"
    assert summary["final_test_err"] == summary["final_val_err"]


# ---------------------------------------------------------------- data order and the EMA


def _orders(order: str) -> list[list[int]]:
    x = torch.zeros(12, 3, 2, 2, dtype=torch.uint8)
    y = torch.arange(12)
    loader = Loader(
        x, y, 4, mean=(0, 0, 0), std=(1, 1, 1), shuffle=True, drop_last=True, seed=1, order=order
    )
    out = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        out.append(torch.cat([b for _, b in loader]).tolist())
    return out


def test_data_orders():
    reshuffle, fixed, replacement = (_orders(o) for o in ("reshuffle", "fixed", "replacement"))
    assert all(sorted(e) == list(range(12)) for e in reshuffle + fixed)
    assert len({tuple(e) for e in reshuffle}) == 3
    assert len({tuple(e) for e in fixed}) == 1 and fixed[0] == reshuffle[0]
    assert any(len(set(e)) < 12 for e in replacement)  # draws repeat: no epoch boundary
    with pytest.raises(DataError, match="unknown data order"):
        Loader(torch.zeros(2, 3, 1, 1, dtype=torch.uint8), torch.zeros(2), 1, mean=(0,) * 3,
               std=(1,) * 3, order="sorted")  # fmt: skip


def test_bias_corrected_ema_gives_no_start_value_a_fixed_weight():
    cfg = mlp(ema_bias_correction=True, ema=0.9)
    state, shown = ema_update(None, 5.0, 1, cfg)
    assert shown == pytest.approx(5.0)  # the first value, exactly, as Adam's m_hat
    for step in range(2, 200):
        state, shown = ema_update(state, 1.0, step, cfg)
    assert shown == pytest.approx(1.0, abs=1e-6)
    plain = mlp(ema=0.9)
    s = None
    for step in range(1, 4):
        s, v = ema_update(s, 5.0 if step == 1 else 1.0, step, plain)
    assert v == pytest.approx(0.81 * 5 + 0.19 * 1)  # the start value keeps 0.9^2
    assert ema_value(state, 199, plain) == state


def test_ss_warmup_scales_the_shift_scale_group_alone():
    cfg = mlp(shift="layer", scale="layer", ss_lr_mult=1.0, ss_warmup_epochs=1.0, lr=0.1)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    from surgeon.passes import insert

    opt = build_optimizer(insert(model, "layer", "layer", input_size=(2,)), cfg)
    lrs = []
    for step in range(6):
        set_lr(opt, cfg, lr_factor(cfg, step, 4))
        ss_warmup(opt, cfg, step, 4)
        lrs.append({g["name"]: g["lr"] for g in opt.param_groups})
    assert [r["weights"] for r in lrs] == [0.1] * 6
    assert [r["shift_scale"] for r in lrs] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])


def test_science_fields_are_validated():
    for bad, needle in (
        ({"final": "last"}, "invalid --final"),
        ({"data_order": "sorted"}, "invalid --data-order"),
        ({"val_size": -1}, "--val-size must be >= 0"),
        ({"ss_warmup_epochs": -1.0}, "--ss-warmup-epochs"),
        ({"classes": -2}, "--classes"),
    ):
        with pytest.raises(TrainError, match=re.escape(needle)):
            mlp(**bad)


# ---------------------------------------------------------------- dataset kind checks


def _cifar100_folder(root: Path, classes: int) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 1)):
        for c in range(classes):
            folder = root / split / f"c{c:03d}"
            folder.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


def test_cifar100_image_folder_loads_and_a_wrong_class_count_is_an_error(tmp_path):
    folder = _cifar100_folder(tmp_path / "c100", 100)
    data = load_data(str(folder), cache_dir=tmp_path / "cache", val_size=100)
    assert data.num_classes == 100 and torch.bincount(data.val_y).tolist() == [1] * 100
    cfg = mlp(data=str(folder), classes=100, limit_train=None, limit_test=None, epochs=1)
    summary = run_configs([cfg], tmp_path / "runs", strict=True)[0]
    assert summary["status"] == "ok"
    small = _cifar100_folder(tmp_path / "c3", 3)
    wrong = mlp(data=str(small), classes=100, limit_train=None, limit_test=None, batch_size=3)
    with pytest.raises(TrainError, match="has 3 classes; this run is for 100"):
        run_configs([wrong], tmp_path / "runs2", recipe_name="r")  # not recorded: it stops


def test_cifar100_torchvision_form(tmp_path, monkeypatch):
    from torchvision import datasets

    base = tmp_path / "root" / datasets.CIFAR100.base_folder
    base.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, n in (("train", 200), ("test", 100)):
        entry = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "fine_labels": [i % 100 for i in range(n)],
        }
        (base / name).write_bytes(pickle.dumps(entry))
    meta = {"fine_label_names": [f"class{i}" for i in range(100)]}
    (base / "meta").write_bytes(pickle.dumps(meta))
    from torchvision.datasets import cifar  # generated files: skip torchvision's md5 checks

    monkeypatch.setattr(datasets.CIFAR100, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    data = load_data("cifar100", tmp_path / "root", cache_dir=tmp_path / "cache", val_size=100)
    assert data.num_classes == 100 and data.source == "cifar100"
    assert len(data.train_y) == 100 and len(data.val_y) == 100 and len(data.test_y) == 100


# ---------------------------------------------------------------- the thesis recipes


def test_thesis_dry_run_shows_the_thesis_settings(capsys, monkeypatch):
    from surgeon_cli import common

    monkeypatch.setattr(common.console, "width", 300)  # one line per run
    try:
        main(["train", "--recipe", "thesis-1-c10-allconv", "--dry-run"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    out = capsys.readouterr().out
    assert "99 run(s)" in out
    for word in ("ss lr x", "augment", "final", "val split", "Springenberg"):
        assert word in out
    row = next(line for line in out.splitlines() if "plain_lr0.02_s0" in line)
    cells = [c.strip() for c in re.split(r"[│┃]", row) if c.strip()]
    assert cells[3:] == ["0.02", "1", "0", "30", "128", "cifar10", "10", "off", "output", "5000"]


def test_recipe_for_cifar100_refuses_cifar10_data(tmp_path):
    folder = _cifar100_folder(tmp_path / "c10", 10)
    configs = load_recipe("thesis-5-c100-allconv").configs(
        {
            "data": str(folder),
            "seed": 0,
            "lr": 0.04,
            "epochs": 1,
            "val_size": 10,
            "model": "mlp",
            "batch_size": 10,
        }  # fmt: skip
    )
    with pytest.raises(TrainError, match="has 10 classes; this run is for 100"):
        run_configs(configs[:1], tmp_path / "out", recipe_name="thesis-5-c100-allconv")
