"""Recipes: every shipped recipe loads and expands, flags override the grid, bad recipes fail
with one clear error, --dry-run lists the runs, and a grid with a diverging run completes."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
from surgeon_cli.app import main

from surgeon.errors import TrainError
from surgeon.train import load_recipe, parse_variant
from surgeon.train.recipes import GRID_KEYS, available

SHIPPED = sorted(available())
TESTED_COMBOS = {
    "shift-element", "shift-channel", "shift-layer", "scale-element", "scale-channel",
    "scale-layer", "shift-element+scale-element", "shift-channel+scale-channel",
    "shift-layer+scale-layer",
}  # fmt: skip
LAYER_COMBOS = {"shift-layer", "scale-layer", "shift-layer+scale-layer"}


@pytest.fixture(scope="module", autouse=True)
def _env(training_env):
    """The shared data cache and one torch thread (``training_env`` in conftest.py)."""


def thesis(n: int) -> str:
    (name,) = [s for s in SHIPPED if s.startswith(f"thesis-{n}-")]
    return name


def test_shipped_recipes_are_the_thesis_six_and_quick():
    assert "quick" in SHIPPED
    assert [thesis(n) for n in range(1, 7)]  # exactly one per experiment


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_loads_and_expands(name):
    recipe = load_recipe(name)
    assert recipe.name == name and recipe.description
    assert set(recipe.grid) <= set(GRID_KEYS)
    configs = recipe.configs()
    expected = math.prod(len(v) for v in recipe.grid.values())
    assert len(configs) == expected
    names = [c.name for c in configs]
    assert len(set(names)) == len(names)
    points = {(c.variant, c.lr, c.seed, c.tag) for c in configs}
    assert len(points) == expected
    for c in configs:
        case = next(
            (
                k
                for k in recipe.grid.get("case", [])
                if k["tag"] == c.tag
                and all(
                    k.get(f, getattr(c, f)) == getattr(c, f) for f in ("norm", "shift", "scale")
                )
            ),
            {},
        )
        for key, value in {**recipe.base, **case}.items():
            if key != "tag":
                assert getattr(c, key) == value, (c.name, key)
        assert parse_variant(c.variant) == {"norm": c.norm, "shift": c.shift, "scale": c.scale}
    for key, values in recipe.grid.items():
        if key == "case":
            assert {c.tag for c in configs} == {v["tag"] for v in values}
            continue
        got = {c.variant if key == "variant" else getattr(c, key) for c in configs}
        assert got == set(values), key
    # by path: the same runs
    by_path = load_recipe(str(available()[name]))
    assert [c.name for c in by_path.configs()] == names


@pytest.mark.parametrize(
    "n, model, data, dropout",
    [
        (1, "allconv", "cifar10", False),
        (2, "allconv", "cifar10", True),
        (3, "mlp", "cifar10", False),
        (4, "mlp", "cifar10", True),
        (5, "allconv", "cifar100", False),
        (6, "allconv", "cifar100", True),
    ],
)
def test_thesis_recipes(n, model, data, dropout):
    configs = load_recipe(thesis(n)).configs()
    assert {(c.model, c.data, c.dropout) for c in configs} == {(model, data, dropout)}
    assert {c.lr for c in configs} == {0.02, 0.04, 0.08}
    assert {(c.momentum, c.schedule) for c in configs} == {(0.9, "constant")}
    variants = {c.variant for c in configs}
    assert {"plain", "batchnorm"} | LAYER_COMBOS <= variants
    if n == 1:  # every tested combination
        assert variants == {"plain", "batchnorm"} | TESTED_COMBOS
    else:  # layer-wise combinations only (the thesis's sets for experiments 2-6)
        assert variants == {"plain", "batchnorm"} | LAYER_COMBOS
    # the thesis's settings: multiplier 1, no augmentation, its site rule, Springenberg's
    # net (the built-in's default), a validation split, the dataset's class count, 3 seeds
    assert {(c.ss_lr_mult, c.augment, c.final, c.val_size) for c in configs} == {
        (1.0, False, "output", 5000)
    }
    assert {c.classes for c in configs} == {100 if data == "cifar100" else 10}
    assert "final_relu" not in {k for c in configs for k in c.model_args}
    assert {c.seed for c in configs} == {0, 1, 2}


def test_variant_flags_name_the_whole_variant():
    """--norm batchnorm under a recipe is batch norm alone; --shift layer is shift alone."""
    recipe = load_recipe(thesis(3))
    assert {c.variant for c in recipe.configs({"norm": "batchnorm"})} == {"batchnorm"}
    assert {c.variant for c in recipe.configs({"shift": "layer"})} == {"shift-layer"}
    both = recipe.configs({"norm": "batchnorm", "scale": "layer"})
    assert {c.variant for c in both} == {"batchnorm+scale-layer"}


def test_grid_cases_are_an_axis_with_tags(tmp_path):
    path = tmp_path / "cases.toml"
    path.write_text(
        '[base]\nmodel = "mlp"\n[grid]\nvariant = ["shift-layer+scale-layer"]\n'
        "seed = [0, 1]\n"
        'case = [{ tag = "m1", ss_lr_mult = 1.0 }, { tag = "warm", ss_warmup_epochs = 2 }]\n'
    )
    configs = load_recipe(str(path)).configs()
    assert len(configs) == 4
    warm = [c for c in configs if c.tag == "warm"]
    assert {c.ss_warmup_epochs for c in warm} == {2.0}
    assert {c.name for c in warm} == {
        "shift-layer+scale-layer_lr0.04_s0_warm",
        "shift-layer+scale-layer_lr0.04_s1_warm",
    }
    for bad, needle in (
        ("case = [{ ss_lr_mult = 1.0 }]", "a table with a tag"),
        ('case = [{ tag = "a", nope = 1 }]', "unknown field(s) nope"),
        ('case = [{ tag = "a" }, { tag = "a" }]', "repeated case tags"),
        ('case = [{ tag = "a", shift = "layer" }, { tag = "a", shift = "layer" }]', "repeated"),
    ):
        path.write_text(f"[grid]\n{bad}\n")
        with pytest.raises(TrainError, match=re.escape(needle)):
            load_recipe(str(path))
    # one tag over cases of different variants: each case is its own run
    path.write_text(
        '[grid]\nlr = [0.04]\nseed = [0]\ncase = [{ tag = "m1", shift = "layer", scale = "none" },'
        ' { tag = "m1", shift = "none", scale = "layer" }]\n'
    )
    assert [c.name for c in load_recipe(str(path)).configs()] == [
        "shift-layer_lr0.04_s0_m1",
        "scale-layer_lr0.04_s0_m1",
    ]


def test_quick_recipe_runs_offline_on_cpu():
    configs = load_recipe("quick").configs()
    assert {(c.data, c.device) for c in configs} == {("sample", "cpu")}
    assert {"plain", "batchnorm"} <= {c.variant for c in configs}


def test_flags_override_the_recipe():
    recipe = load_recipe(thesis(1))
    full = recipe.configs()
    n_var, n_seed = len(recipe.grid["variant"]), len(recipe.grid["seed"])
    by_lr = recipe.configs({"lr": 0.1})
    assert {c.lr for c in by_lr} == {0.1} and len(by_lr) == n_var * n_seed
    by_seed = recipe.configs({"seed": 3})
    assert {c.seed for c in by_seed} == {3} and len(by_seed) == n_var * 3
    plain_flags = recipe.configs({"epochs": 1, "data": "sample", "batch_size": 32})
    assert len(plain_flags) == len(full)
    assert {(c.epochs, c.data, c.batch_size) for c in plain_flags} == {(1, "sample", 32)}
    # --shift/--scale/--norm replace the variant axis
    one = recipe.configs({"shift": "channel", "scale": "none"})
    assert {c.variant for c in one} == {"shift-channel"} and len(one) == 3 * n_seed
    bn = recipe.configs({"norm": "batchnorm", "shift": "none", "scale": "none"})
    assert {c.variant for c in bn} == {"batchnorm"}
    # the recipe itself is unchanged
    assert [c.name for c in recipe.configs()] == [c.name for c in full]


@pytest.mark.parametrize(
    "text, needle",
    [
        ('[base]\nmodle = "mlp"\n', "unknown config key(s): modle"),
        ("[grid]\nbatch_size = [32, 64]\n", "unknown grid key(s) batch_size"),
        ("[training]\nlr = 0.1\n", "unknown section(s) training"),
        ("name = \n", "not valid TOML"),
        ('[grid]\nvariant = ["shift-diagonal"]\n', "unknown variant 'shift-diagonal'"),
        ('[base]\nschedule = "linear"\n', "invalid --schedule 'linear'"),
        ("[base]\nlr = -1.0\n", "--lr must be positive"),
        ("[grid]\nlr = [0.04, 0.04]\n", "duplicate runs"),
        ('[grid]\nvariant = ["plain", "none"]\n', "duplicate runs"),
    ],
)
def test_bad_recipes_fail_at_load(tmp_path, text, needle):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(TrainError) as err:
        load_recipe(str(path))
    assert needle in err.value.message
    assert err.value.hint


def test_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(TrainError) as err:
        load_recipe("no-such-recipe")
    assert "unknown recipe 'no-such-recipe'" in err.value.message
    assert all(name in err.value.hint for name in SHIPPED)


def test_bad_recipe_through_the_cli(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('[base]\nmodle = "mlp"\n')
    assert main(["train", "--recipe", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown config key(s): modle")
    assert ". hint: valid keys:" in err[0]


def test_dry_run_lists_the_runs_without_training(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["train", "--recipe", thesis(1), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    configs = load_recipe(thesis(1)).configs()
    assert f"{len(configs)} run(s) into {out / thesis(1)}" in text
    for c in configs:
        assert c.name in text
    assert not out.exists()
    # overrides show up in the plan
    argv = ["train", "--recipe", "quick", "--out", str(out), "--dry-run", "--lr", "0.1"]
    assert main([*argv, "--shift", "channel", "--scale", "none"]) == 0
    text = capsys.readouterr().out
    assert "1 run(s)" in text and "shift-channel_lr0.1_s0" in text
    assert not out.exists()


GRID = """
name = "tiny-grid"
description = "two variants x a good and a diverging LR"
[base]
model = "mlp"
model_args = { hidden = [16] }
data = "sample"
limit_train = 200
limit_test = 100
epochs = 1
batch_size = 50
device = "cpu"
augment = false
[grid]
variant = ["plain", "shift-layer+scale-layer"]
lr = [0.04, 1e6]
seed = [0]
"""


def test_recipe_grid_with_a_diverging_lr(tmp_path, capsys):
    path = tmp_path / "tiny.toml"
    path.write_text(GRID)
    runs = tmp_path / "runs"
    assert main(["train", "--recipe", str(path), "--out", str(runs), "--quiet"]) == 0
    out = capsys.readouterr().out
    folder = runs / "tiny-grid"
    saved = json.loads((folder / "results.json").read_text())
    assert saved["recipe"] == "tiny-grid"
    status = {(r["variant"], r["lr"]): r["status"] for r in saved["runs"]}
    assert status == {
        ("plain", 0.04): "ok",
        ("plain", 1e6): "diverged",
        ("shift-layer+scale-layer", 0.04): "ok",
        ("shift-layer+scale-layer", 1e6): "diverged",
    }
    with open(folder / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert sorted(r["name"] for r in table) == sorted(r["name"] for r in saved["runs"])
    for r in saved["runs"]:
        assert json.loads((folder / r["name"] / "summary.json").read_text()) == r
        if r["status"] == "ok":
            assert r["epochs_run"] == 1 and r["best_epoch"] == 1
            assert r["final_val_err"] == r["best_val_err"] is not None
    # the final table: every run, the diverged ones flagged with their step
    assert out.count("diverged at step") == 2
    assert "shift-layer+scale-layer" in out and f"results: {folder / 'results.csv'}" in out
    assert "diverged: non-finite loss at step" in out  # the run's own message, plain lines
    # a second launch into the same folder fails up front instead of N failed runs
    before = (folder / "results.json").read_text()
    assert main(["train", "--recipe", str(path), "--out", str(runs), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "hint: pass --resume" in err[0]
    assert (folder / "results.json").read_text() == before
