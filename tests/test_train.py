"""Training engine: variants from one init, optimiser and schedules, the run folder, bit-exact
resume, divergence. Tiny MLPs / narrow All-CNN-Cs on a class-balanced slice of the sample."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import surgeon
from surgeon.data import Loader, load_data
from surgeon.errors import TrainError
from surgeon.layers import MODES, ChannelBatchNorm, ShiftScale
from surgeon.train import (
    TrainConfig,
    Trainer,
    build_base,
    derive,
    parse_variant,
    resume,
    run_configs,
    variant_name,
)
from surgeon.train import runner as runner_mod
from surgeon.train.optim import build_optimizer, decay_to_identity, lr_factor, set_lr, split_params

SIZE = (3, 32, 32)
VOLATILE = {"time_s", "images_per_s"}  # the only metrics allowed to differ between equal runs


@pytest.fixture(scope="module", autouse=True)
def _env(training_env):
    """The shared data cache and one torch thread (``training_env`` in conftest.py)."""


@pytest.fixture(scope="module")
def data():
    return load_data("sample", limit_train=200, limit_test=100)


def mlp(**kw) -> TrainConfig:
    """A tiny MLP run on 200/100 sample images: 4 steps per epoch at batch 50."""
    base = {
        "model": "mlp", "model_args": {"hidden": (32,)}, "data": "sample", "limit_train": 200,
        "limit_test": 100, "epochs": 2, "batch_size": 50, "device": "cpu", "augment": False,
    }  # fmt: skip
    return TrainConfig(**{**base, **kw})


def allconv(**kw) -> TrainConfig:
    return TrainConfig(**{"model": "allconv", "model_args": {"width": 0.125}, **kw})


def rows(folder: Path, kind: str) -> list[dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def snapshots(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.stem: load_file(str(p)) for p in sorted((folder / "snapshots").iterdir())}


def strip_volatile(rs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rs]


# --- one base model, one init, every variant by surgery --------------------------------------


def test_base_is_built_from_the_seed():
    cfg = allconv()
    a, b = build_base(cfg, 10, SIZE), build_base(cfg, 10, SIZE)
    c = build_base(cfg.replace(seed=1), 10, SIZE)
    assert_same_tensors(a.state_dict(), b.state_dict())
    for name, p in a.named_parameters():
        if name.endswith("weight"):
            assert not torch.equal(p, c.get_parameter(name)), name
        else:  # He init: zero biases
            assert not p.any()
    big = build_base(mlp(model_args={}), 10, SIZE)  # 3072-1024-512-256-10
    w = big.get_parameter("layers.2.weight")
    assert w.shape == (1024, 3072)
    assert w.std().item() == pytest.approx(math.sqrt(2 / 3072), rel=0.02)


VARIANTS = [
    "plain",
    "batchnorm",
    "shift-layer+scale-layer",
    "shift-channel+scale-channel",
    "shift-element",
    "scale-channel",
    "batchnorm+shift-layer+scale-layer",
]


@pytest.mark.parametrize("make", [allconv, mlp], ids=["allconv", "mlp"])
def test_variants_share_the_init_bit_for_bit(make, data, tmp_path):
    cfg = make()
    base = build_base(cfg, 10, SIZE)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    x = torch.randn(4, *SIZE, generator=torch.Generator().manual_seed(1))
    base.eval()
    reference = base(x)
    for v in VARIANTS:
        vcfg = cfg.replace(**parse_variant(v))
        assert vcfg.variant == v
        model = derive(base, vcfg, SIZE)
        params = dict(model.named_parameters())
        for name, p in base.named_parameters():
            assert torch.equal(params[name], p), (v, name)
            assert params[name].data_ptr() != p.data_ptr()  # a copy: training it leaves base alone
        if "batchnorm" not in v:  # shift 0 / scale 1 at init: the very same function
            assert torch.equal(model.eval()(x), reference), v
    assert_same_tensors(base.state_dict(), before)
    # a Trainer given only the config builds the same base from the seed
    for v in VARIANTS[:3]:
        trainer = Trainer(cfg.replace(**parse_variant(v)), tmp_path / v, data=data)
        params = dict(trainer.model.named_parameters())
        for name, p in base.named_parameters():
            assert torch.equal(params[name], p), (v, name)


def test_grid_builds_one_base_per_seed(data, tmp_path, monkeypatch):
    built = []
    real = runner_mod.build_base

    def spy(cfg, num_classes, size):
        built.append(cfg.seed)
        return real(cfg, num_classes, size)

    monkeypatch.setattr(runner_mod, "build_base", spy)
    configs = [
        mlp(epochs=1, seed=s, **parse_variant(v))
        for s in (0, 1)
        for v in ("plain", "batchnorm", "shift-layer+scale-layer")
    ]
    results = run_configs(configs, tmp_path)
    assert [r["status"] for r in results] == ["ok"] * 6
    assert sorted(built) == [0, 1]


def test_a_grid_run_equals_the_same_run_alone(data, tmp_path):
    """With dropout (global RNG), a run does not depend on the runs before it in a grid."""
    first, second = (
        mlp(epochs=1, dropout=True, shift="none", scale="none"),
        mlp(epochs=1, dropout=True),
    )
    run_configs([first, second], tmp_path / "grid")
    Trainer(second, tmp_path / "alone", data=data).run()
    grid = (tmp_path / "grid" / second.name / "model.safetensors").read_bytes()
    assert grid == (tmp_path / "alone" / "model.safetensors").read_bytes()


@pytest.mark.parametrize(
    "make, count, final, ndim, reference",
    [(allconv, 8, 1, 4, nn.BatchNorm2d), (mlp, 1, 0, 2, nn.BatchNorm1d)],
    ids=["allconv", "mlp"],
)
def test_batchnorm_variant(make, count, final, ndim, reference):
    cfg = make(norm="batchnorm", shift="none", scale="none")
    model = derive(build_base(cfg, 10, SIZE), cfg, SIZE)
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert len(bns) == count
    relus = [
        n
        for n in model.graph.nodes
        if n.op == "call_module" and isinstance(model.get_submodule(n.target), nn.ReLU)
    ]
    # every non-final activation gets one BN; All-CNN-C's ReLU after its last conv is final
    assert len(relus) == count + final
    for node in relus[:count]:
        (src,) = node.all_input_nodes
        assert src.op == "call_module" and src.target in bns  # BN right before the activation
        (layer,) = src.all_input_nodes
        weight = model.get_submodule(layer.target)
        assert isinstance(weight, (nn.Conv2d, nn.Linear))
        out_features = getattr(weight, "out_channels", None) or weight.out_features
        assert bns[src.target].num_features == out_features
    for node in relus[count:]:  # a final activation gets none
        assert not any(a.op == "call_module" and a.target in bns for a in node.all_input_nodes)
    # the final layer feeds no BN
    last = [n for n in model.graph.nodes if n.op == "output"][0]
    assert not any(a.target in bns for a in last.all_input_nodes if a.op == "call_module")
    bn = next(iter(bns.values()))
    assert isinstance(bn, ChannelBatchNorm) and bn.ndim == ndim and bn.channel_dim == 1
    ref = reference(bn.num_features)
    ref.load_state_dict(bn.state_dict())
    shape = (6, bn.num_features, 5, 4) if ndim == 4 else (6, bn.num_features)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3 + 1
    bn.train(), ref.train()
    torch.testing.assert_close(bn(x), ref(x))  # batch statistics over N (and H, W)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    bn.eval(), ref.eval()
    torch.testing.assert_close(bn(x), ref(x))
    with pytest.raises(ValueError):
        bn(x.flatten(1) if ndim == 4 else x[:, :, None, None])


def test_all_16_shift_scale_combinations_build():
    cfg = allconv()
    base = build_base(cfg, 10, SIZE).eval()
    x = torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(0))
    reference = base(x)
    expect = {"none": None, "layer": (), "channel": (3,), "element": SIZE}
    seen = set()
    for shift in MODES:
        for scale in MODES:
            vcfg = cfg.replace(shift=shift, scale=scale)
            assert vcfg.variant == variant_name("none", shift, scale)
            assert parse_variant(vcfg.variant) == {"norm": "none", "shift": shift, "scale": scale}
            seen.add(vcfg.name)
            model = derive(base, vcfg, SIZE)
            ss = [m for m in model.modules() if isinstance(m, ShiftScale)]
            assert len(ss) == (0 if shift == scale == "none" else 9)  # input + 8 activations
            if ss:  # the input site: (3, 32, 32)
                for attr, mode in (("shift", shift), ("scale", scale)):
                    p = getattr(ss[0], attr)
                    assert (None if p is None else tuple(p.shape)) == expect[mode], (attr, mode)
            assert torch.equal(model.eval()(x), reference), vcfg.variant
    assert len(seen) == 16  # 16 distinct run names


# --- optimisation ------------------------------------------------------------------------------


def surgered(cfg: TrainConfig) -> nn.Module:
    return derive(build_base(cfg, 10, SIZE), cfg, SIZE)


def test_param_groups():
    cfg = mlp(
        norm="batchnorm", shift="channel", scale="layer", lr=0.04, ss_lr_mult=0.25, wd=5e-4,
        ss_wd=1e-3, ss_decay_to="zero", nesterov=True,
    )  # fmt: skip
    model = surgered(cfg)
    opt = build_optimizer(model, cfg)
    groups = {g["name"]: g for g in opt.param_groups}
    assert list(groups) == ["weights", "shift_scale"]
    inserted = {id(p) for m in model.modules() if isinstance(m, ShiftScale) for p in m.parameters()}
    assert len(inserted) == 4  # input and hidden activation: shift and scale each
    assert {id(p) for p in groups["shift_scale"]["params"]} == inserted
    own = {id(p) for p in model.parameters()} - inserted  # Linear and BatchNorm weights
    assert {id(p) for p in groups["weights"]["params"]} == own
    w, ss = groups["weights"], groups["shift_scale"]
    assert (w["lr"], w["weight_decay"]) == (0.04, 5e-4)
    assert ss["lr"] == pytest.approx(0.01) and ss["weight_decay"] == 1e-3
    assert w["momentum"] == ss["momentum"] == 0.9 and w["nesterov"]
    assert set_lr(opt, cfg, 0.5) == pytest.approx(0.02)
    assert (w["lr"], ss["lr"]) == (pytest.approx(0.02), pytest.approx(0.005))
    # decay towards identity is applied to the gradients, so the group's own decay is off
    ident = build_optimizer(model, cfg.replace(ss_decay_to="identity"))
    assert ident.param_groups[1]["weight_decay"] == 0.0
    # the plain variant has a single group
    plain = mlp(shift="none", scale="none")
    assert [g["name"] for g in build_optimizer(surgered(plain), plain).param_groups] == ["weights"]
    _, shifts, scales = split_params(model)
    assert len(shifts) == len(scales) == 2


def test_shift_scale_group_lr_multiplier_in_training(data, tmp_path):
    """ss_lr_mult=0 freezes the inserted parameters while the weights train."""
    cfg = mlp(epochs=1, ss_lr_mult=0.0, shift="channel", scale="channel")
    trainer = Trainer(cfg, tmp_path / "run", data=data)
    init = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert trainer.run()["status"] == "ok"
    snaps = snapshots(tmp_path / "run")
    assert_same_tensors(snaps["epoch_0000"], snaps["epoch_0001"])
    for k, v in weights(tmp_path / "run").items():
        assert torch.equal(v, init[k]) == k.startswith("ss_"), k


def test_schedules():
    spe = 10  # steps per epoch
    constant = mlp(epochs=10)
    assert {lr_factor(constant, s, spe) for s in range(100)} == {1.0}
    cos = mlp(epochs=10, schedule="cosine")
    assert lr_factor(cos, 0, spe) == 1.0
    assert lr_factor(cos, 25, spe) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(cos, 50, spe) == pytest.approx(0.5)
    assert lr_factor(cos, 99, spe) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.99)))
    assert lr_factor(cos, 100, spe) == pytest.approx(0.0, abs=1e-12)
    step = mlp(epochs=9, schedule="step")  # default: decay by 0.1 every third of the run
    assert [lr_factor(step, s, spe) for s in (0, 29, 30, 59, 60, 89)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )
    step2 = mlp(epochs=8, schedule="step", step_size=2, gamma=0.5)
    assert [lr_factor(step2, s, spe) for s in (19, 20, 39, 40, 79)] == pytest.approx(
        [1, 0.5, 0.5, 0.25, 0.125]
    )
    warm = mlp(epochs=10, schedule="cosine", warmup_epochs=2)  # 20 warm-up steps
    assert lr_factor(warm, 0, spe) == pytest.approx(1 / 20)
    assert lr_factor(warm, 9, spe) == pytest.approx(10 / 20)
    assert lr_factor(warm, 19, spe) == 1.0
    assert lr_factor(warm, 20, spe) == 1.0  # cosine starts after the warm-up
    assert lr_factor(warm, 60, spe) == pytest.approx(0.5)
    warm_const = mlp(epochs=10, warmup_epochs=0.5)
    assert [lr_factor(warm_const, s, spe) for s in (0, 4, 5, 50)] == pytest.approx(
        [0.2, 1.0, 1.0, 1.0]
    )


def test_decay_to_identity_gradient_term():
    cfg = mlp(shift="channel", scale="channel")
    model = surgered(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ShiftScale):
                m.shift.copy_(torch.randn(m.shift.shape, generator=g))
                m.scale.copy_(1 + torch.randn(m.scale.shape, generator=g))
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    decay_to_identity(model, 0.3)
    _, shifts, scales = split_params(model)
    for p in shifts:
        torch.testing.assert_close(p.grad, 0.25 + 0.3 * p.detach())
    for p in scales:
        torch.testing.assert_close(p.grad, 0.25 + 0.3 * (p.detach() - 1))
    own, _, _ = split_params(model)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in own)
    before = [p.grad.clone() for p in model.parameters()]
    decay_to_identity(model, 0.0)  # no decay: gradients untouched
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("to", ["identity", "zero"])
def test_shift_scale_decay_pulls_toward_identity_or_zero(to):
    """With a zero loss gradient, n SGD steps shrink (p - target) by (1 - lr * wd)^n."""
    cfg = mlp(shift="layer", scale="layer", lr=0.1, ss_lr_mult=2.0, ss_wd=0.25, momentum=0.0)
    cfg = cfg.replace(ss_decay_to=to)
    model = surgered(cfg)
    _, shifts, scales = split_params(model)
    assert len(shifts) == len(scales) == 2
    with torch.no_grad():
        for shift, scale in zip(shifts, scales):
            shift.fill_(2.0), scale.fill_(3.0)
    opt = build_optimizer(model, cfg)
    x = torch.randn(4, *SIZE)
    n = 10
    for _ in range(n):  # the engine's order: backward, decay, step
        opt.zero_grad(set_to_none=True)
        (model(x) * 0).sum().backward()
        if cfg.ss_decay_to == "identity":
            decay_to_identity(model, cfg.ss_wd)
        opt.step()
    shrink = (1 - 0.1 * 2.0 * 0.25) ** n
    scale_target = 1.0 if to == "identity" else 0.0
    for shift, scale in zip(shifts, scales):
        assert shift.item() == pytest.approx(2.0 * shrink, rel=1e-5)
        assert scale.item() == pytest.approx(scale_target + (3.0 - scale_target) * shrink, rel=1e-5)


# --- the run folder -------------------------------------------------------------------------


def probed_config(**kw) -> TrainConfig:
    return mlp(
        shift="layer", scale="channel", dropout=True, augment=True, ema=0.9, schedule="cosine",
        warmup_epochs=0.5, probe=True, **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def probed(tmp_path_factory, data):
    """A 2-epoch run with dropout, augmentation, warm-up + cosine, EMA 0.9 and probes."""
    out = tmp_path_factory.mktemp("runs") / "probed"
    cfg = probed_config()
    trainer = Trainer(cfg, out, data=data)
    summary = trainer.run()
    return cfg, trainer, summary, out


def test_config_and_data_json(probed, data):
    cfg, _, _, out = probed
    saved = json.loads((out / "config.json").read_text())
    expected = json.loads(json.dumps(cfg.to_dict()))
    assert {k: saved[k] for k in expected} == expected
    assert saved["variant"] == "shift-layer+scale-channel"
    assert saved["name"] == "shift-layer+scale-channel_lr0.04_s0"
    assert saved["model_args"] == {"hidden": [32]} and saved["ss_lr_mult"] == 0.1
    info = json.loads((out / "data.json").read_text())
    assert (info["train"], info["test"], info["source"]) == (200, 100, "sample")
    assert info["mean"] == list(data.mean) and info["std"] == list(data.std)


def test_step_metrics(probed):
    cfg, _, _, out = probed
    steps = rows(out, "step")
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert [r["epoch"] for r in steps] == [0] * 4 + [1] * 4
    ema = None
    for r in steps:
        assert math.isfinite(r["loss"])
        ema = r["loss"] if ema is None else cfg.ema * ema + (1 - cfg.ema) * r["loss"]
        assert r["ema_loss"] == ema  # exactly: the same recurrence on the logged losses
        assert r["lr"] == cfg.lr * lr_factor(cfg, r["step"] - 1, 4)
    assert steps[0]["lr"] == pytest.approx(0.02)  # warm-up: 2 steps, the first at half the LR
    assert steps[1]["lr"] == steps[2]["lr"] == cfg.lr  # cosine starts at the full LR
    assert steps[-1]["lr"] < steps[2]["lr"]


def test_epoch_metrics_and_summary(probed, data):
    cfg, trainer, summary, out = probed
    steps, epochs = rows(out, "step"), rows(out, "epoch")
    assert [(r["epoch"], r["step"]) for r in epochs] == [(1, 4), (2, 8)]
    for r, chunk in zip(epochs, (steps[:4], steps[4:])):
        assert r["val_acc"] == 1 - r["val_err"]
        assert r["train_acc"] == pytest.approx(1 - r["train_err"], abs=1e-12)
        assert r["train_loss"] == pytest.approx(sum(s["loss"] for s in chunk) / 4, rel=1e-6)
        assert r["ema_loss"] == chunk[-1]["ema_loss"] and r["lr"] == chunk[-1]["lr"]
        assert math.isfinite(r["val_loss"]) and 0 <= r["val_err"] <= 1
        assert round(r["val_err"] * 100) == pytest.approx(r["val_err"] * 100)  # 100 test images
        assert r["time_s"] > 0 and r["images_per_s"] > 0
    errs = [r["val_err"] for r in epochs]
    assert summary["status"] == "ok" and summary["diverged_at_step"] is None
    assert (summary["epochs_run"], summary["steps"]) == (2, 8)
    assert summary["final_val_err"] == errs[-1] and summary["best_val_err"] == min(errs)
    assert summary["best_epoch"] == errs.index(min(errs)) + 1
    assert json.loads((out / "summary.json").read_text()) == summary
    with open(out / "summary.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["name"], row["variant"], row["status"]) == (cfg.name, cfg.variant, "ok")
    assert (row["steps"], row["epochs_run"], float(row["final_val_err"])) == ("8", "2", errs[-1])
    # the logged val error is the saved model's error on the test split
    model = surgeon.load(out)
    loader = Loader(data.test_x, data.test_y, 64, mean=data.mean, std=data.std)
    with torch.no_grad():
        wrong = sum(int((model(x).argmax(1) != y).sum()) for x, y in loader)
    assert wrong / 100 == pytest.approx(errs[-1], abs=1e-12)


def test_snapshots_and_saved_model(probed, data):
    _, trainer, _, out = probed
    snaps = snapshots(out)
    assert list(snaps) == ["epoch_0000", "epoch_0001", "epoch_0002"]
    ss = {n: m for n, m in trainer.model.named_modules() if isinstance(m, ShiftScale)}
    keys = {f"{n}.{p}" for n in ss for p in ("shift", "scale")}
    assert len(ss) == 2 and all(s.keys() == keys for s in snaps.values())
    for k, v in snaps["epoch_0000"].items():  # identity at init
        assert torch.equal(v, torch.zeros_like(v) if k.endswith("shift") else torch.ones_like(v))
    assert snaps["epoch_0000"]["ss_x.scale"].shape == (3,)  # channel-wise scale
    trained = dict(trainer.model.named_parameters())
    for k, v in snaps["epoch_0002"].items():
        assert torch.equal(v, trained[k].detach())
    assert not torch.equal(snaps["epoch_0001"]["ss_x.scale"], snaps["epoch_0000"]["ss_x.scale"])
    # surgeon.load gives the trained model
    loaded = surgeon.load(out)
    assert_same_tensors(loaded.state_dict(), trainer.model.state_dict())
    x = next(iter(Loader(data.test_x, data.test_y, 16, mean=data.mean, std=data.std)))[0]
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), trainer.model(x))
    trainer.model.train()


def test_probe_rows(probed):
    _, trainer, _, out = probed
    probes = rows(out, "probe")
    sites = {s["name"] for s in trainer.model.surgeon_record.to_dict()["sites"]}
    assert sites == {"x", "layers_3"}  # the input and the hidden activation
    for epoch in range(3):
        got = [r for r in probes if r["epoch"] == epoch]
        assert {r["site"] for r in got} == sites and len(got) == len(sites)
        for r in got:
            assert r["step"] == 4 * epoch
            assert math.isfinite(r["act_mean"]) and r["act_std"] > 0
            assert r["grad_norm_after"] > 0
            assert (r["grad_norm_before"] is None) == (r["site"] == "x")
            # the mean relative update over the epoch's 4 steps; none before the first step
            assert (r["step_after"] is None) == (epoch == 0)
            assert epoch == 0 or 0 < r["step_after"] < 1
    assert {r["epoch"] for r in probes} == {0, 1, 2}


def test_probe_step_size_is_the_mean_relative_update_per_layer():
    from surgeon.train.probe import Probe

    torch.manual_seed(0)
    gm = surgeon.insert(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), input_size=[6])
    probe = Probe(gm, (6,))
    assert probe.layers == ["0", "2"]
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    for factor in (0.1, 0.3):  # W -> (1 + f) W: a relative update of exactly f
        probe.before_step()
        with torch.no_grad():
            gm.get_submodule("0").weight.mul_(1 + factor)
        probe.after_step()
    rows = {r["kind"]: r for r in probe.measure(x, y)}
    hidden, first = rows["activation"], rows["input"]
    assert hidden["step_before"] == pytest.approx(0.2, rel=1e-5)  # layer 0: mean of 0.1, 0.3
    assert hidden["step_after"] == 0.0  # layer 2 never moved
    assert first["step_before"] is None
    assert first["step_after"] == pytest.approx(0.2, rel=1e-5)
    assert all(r["step_after"] is None for r in probe.measure(x, y))  # reset: no step since


def test_probing_does_not_change_training(probed, data, tmp_path):
    """Same run without --probe: the same bytes, although dropout draws from the global RNG."""
    cfg, _, _, out = probed
    plain = tmp_path / "no-probe"
    assert Trainer(cfg.replace(probe=False), plain, data=data).run()["status"] == "ok"
    assert (plain / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert rows(plain, "step") == rows(out, "step")
    assert not rows(plain, "probe")


# --- bit-exact resume ----------------------------------------------------------------------------


def test_resume_mid_epoch_is_bit_exact(data, tmp_path):
    # 5 steps per epoch; checkpoints at steps 3, 5 (epoch end), 6, 9, 10 (end), ...
    cfg = mlp(epochs=3, batch_size=40, checkpoint_every=3, dropout=True, augment=True)
    full = tmp_path / "full"
    assert Trainer(cfg, full, data=data).run()["status"] == "ok"

    cut = tmp_path / "cut"
    stopped = Trainer(cfg, cut, data=data, stop_at_step=8).run()
    assert stopped["status"] == "stopped"
    pointer = json.loads((cut / "checkpoints" / "latest.json").read_text())
    assert pointer["step"] == 6  # mid-epoch: epoch 2, batch 1 of 5
    assert max(r["step"] for r in rows(cut, "step")) == 8  # logged past the checkpoint
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"type": "step", "step": 9, "epo')  # a line torn by a kill

    summary = resume(cut)  # loads the data itself, from the saved config
    assert summary == json.loads((full / "summary.json").read_text())
    assert (cut / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()
    assert_same_tensors(weights(cut), weights(full))
    assert rows(cut, "step") == rows(full, "step")
    assert strip_volatile(rows(cut, "epoch")) == strip_volatile(rows(full, "epoch"))
    a, b = snapshots(cut), snapshots(full)
    assert a.keys() == b.keys()
    for k in a:
        assert_same_tensors(a[k], b[k])

    # resuming a finished run changes nothing
    again = resume(full, data=data)
    assert again == summary
    assert (full / "model.safetensors").read_bytes() == (cut / "model.safetensors").read_bytes()
    assert rows(full, "step") == rows(cut, "step")


def test_a_checkpoint_written_before_test_history_resumes(data, tmp_path):
    """A checkpoint of an older version lacks run.test_history: the resume rebuilds it from
    metrics.jsonl, and the run ends as an uninterrupted one does."""
    from surgeon.rundir import json_digest

    cfg = mlp(epochs=3, batch_size=40, checkpoint_every=3)
    full = tmp_path / "full"
    assert Trainer(cfg, full, data=data).run()["status"] == "ok"
    cut = tmp_path / "cut"
    assert Trainer(cfg, cut, data=data, stop_at_step=12).run()["status"] == "stopped"
    pointer = json.loads((cut / "checkpoints" / "latest.json").read_text())
    state_path = cut / "checkpoints" / pointer["checkpoint"] / "state.json"
    state = json.loads(state_path.read_text())
    assert len(state["run"].pop("test_history")) == state["run"]["epoch"] == 2
    state.pop("sha256")
    state["sha256"] = json_digest(state)  # signed as the older version signed it
    state_path.write_text(json.dumps(state))
    summary = resume(cut, data=data)
    assert (
        summary["test_err_at_best"]
        == json.loads((full / "summary.json").read_text())["test_err_at_best"]
    )
    assert summary == json.loads((full / "summary.json").read_text())


def test_resume_needs_a_checkpoint(data, tmp_path):
    cfg = mlp(epochs=1, checkpoint_every=3)
    assert Trainer(cfg, tmp_path / "r", data=data, stop_at_step=2).run()["status"] == "stopped"
    with pytest.raises(TrainError, match="nothing to resume"):
        resume(tmp_path / "r", data=data)
    with pytest.raises(TrainError, match="not a run folder"):
        resume(tmp_path / "nowhere")
    with pytest.raises(TrainError, match="already exists"):  # no silent overwrite
        Trainer(cfg, tmp_path / "r", data=data).run()


# --- divergence ----------------------------------------------------------------------------


def test_divergence_keeps_last_good_checkpoint(data, tmp_path):
    cfg = mlp(lr=1e6, checkpoint_every=1)
    out = tmp_path / "run"
    summary = Trainer(cfg, out, data=data).run()
    assert summary["status"] == "diverged"
    step = summary["diverged_at_step"]
    assert isinstance(step, int) and 3 <= step <= 4  # a blow-up in the first epoch
    msg = summary["message"]
    assert f"step {step}" in msg and "lr 1e+06" in msg and cfg.variant in msg
    assert json.loads((out / "summary.json").read_text()) == summary
    with open(out / "summary.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["status"], row["diverged_at_step"]) == ("diverged", str(step))
    # logged steps stop before the bad one
    logged = rows(out, "step")
    assert [r["step"] for r in logged] == list(range(1, step))
    assert all(math.isfinite(r["loss"]) for r in logged)
    # the checkpoint after step-1 holds the weights that gave the non-finite loss: the run
    # folder keeps the one before, whose weights gave the last finite loss
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert ckpts == [f"step_{step - 2:08d}", f"step_{step - 1:08d}"]
    kept = weights(out)
    assert_same_tensors(kept, load_file(str(out / "checkpoints" / ckpts[0] / "model.safetensors")))
    assert all(torch.isfinite(v).all() for v in kept.values())
    model = surgeon.load(out).train()  # the run folder still holds a loadable model
    loader = Loader(
        data.train_x, data.train_y, cfg.batch_size, mean=data.mean, std=data.std,
        shuffle=True, drop_last=True, seed=cfg.seed,
    )  # fmt: skip
    loader.set_epoch((step - 2) // 4)
    x, y = next(loader.iter_from((step - 2) % 4))  # the batch of step-1
    with torch.no_grad():
        loss = F.cross_entropy(model(x), y).item()
    assert math.isfinite(loss) and loss == pytest.approx(logged[-1]["loss"], rel=1e-5)


def test_divergence_before_any_checkpoint_keeps_the_init(data, tmp_path):
    cfg = mlp(lr=1e6)  # checkpoints only at epoch ends: none before the blow-up
    summary = Trainer(cfg, tmp_path / "run", data=data).run()
    assert summary["status"] == "diverged" and summary["epochs_run"] == 0
    init = surgered(cfg).state_dict()
    assert_same_tensors(weights(tmp_path / "run"), dict(init))


def test_divergence_does_not_stop_the_other_runs(tmp_path):
    configs = [mlp(epochs=1, lr=1e6), mlp(epochs=1), mlp(epochs=1, shift="none", scale="none")]
    results = run_configs(configs, tmp_path)
    assert [r["status"] for r in results] == ["diverged", "ok", "ok"]
    assert results[0]["diverged_at_step"] is not None
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in saved["runs"]] == [c.name for c in configs]
    assert [r["status"] for r in saved["runs"]] == ["diverged", "ok", "ok"]
    with open(tmp_path / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["name"], r["status"]) for r in table] == [
        (c.name, s) for c, s in zip(configs, ("diverged", "ok", "ok"))
    ]
    for c in configs:
        assert (tmp_path / c.name / "summary.json").is_file()
