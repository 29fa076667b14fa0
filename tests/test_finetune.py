"""Fine-tuning (issue 17): ``--train-only`` freezes all but the chosen parts (no momentum for
the rest, bit-for-bit unchanged), ``--init-from`` loads base weights from safetensors,
``--placement ssf`` puts the sites after linear/conv/norm layers, and a run writes an adapter
that ``surgeon fold --base`` merges into a plain model with the same output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from surgeon_cli.app import main
from torch import nn

import surgeon
from surgeon.errors import TrainError
from surgeon.io import record_of
from surgeon.layers import ShiftScale
from surgeon.train import TrainConfig, Trainer, build_base, derive
from surgeon.train.optim import build_optimizer
from surgeon.train.parts import counts, head_names, trainable_names

SMALL = ["--limit-train", "200", "--limit-test", "100", "--batch-size", "50", "--device", "cpu"]


@pytest.fixture(scope="module", autouse=True)
def _env(training_env):
    """The shared data cache and one torch thread (``training_env`` in conftest.py)."""


def cli(capsys, *args: str | Path) -> tuple[int, str, str]:
    rc = main([*map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and ". hint: " in lines[0], lines[0]
    return lines[0]


def mlp(**kw) -> tuple[TrainConfig, nn.Module]:
    cfg = TrainConfig(model="mlp", model_args={"hidden": (16, 8)}, device="cpu", **kw)
    return cfg, build_base(cfg, 10, (3, 32, 32))


# --- what trains -------------------------------------------------------------------------------


def test_parts_select_ss_head_norm_bias():
    cfg, base = mlp(shift="channel", scale="channel")
    model = derive(base, cfg, (3, 32, 32))
    heads = head_names(model)
    assert len(heads) == 1 and isinstance(model.get_submodule(heads[0]), nn.Linear)
    ss = {
        f"{n}.{p}"
        for n, m in model.named_modules()
        if isinstance(m, ShiftScale)
        for p in ("shift", "scale")
    }
    assert trainable_names(model, ["ss"]) == ss
    head = trainable_names(model, ["head"])
    assert head == {f"{heads[0]}.weight", f"{heads[0]}.bias"}
    assert trainable_names(model, ["bias"]) == {
        n for n, _ in model.named_parameters() if n.endswith(".bias")
    }
    assert trainable_names(model, []) == {n for n, _ in model.named_parameters()}
    with pytest.raises(TrainError, match="train-only"):
        TrainConfig(train_only="ss,weights")


def test_frozen_out_of_optimiser_and_unchanged():
    cfg, base = mlp(shift="channel", scale="channel", train_only="ss,head")
    model = derive(base, cfg, (3, 32, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(model, cfg)
    train = {n for n, p in model.named_parameters() if p.requires_grad}
    assert train == trainable_names(model, ["ss", "head"])
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3, 32, 32)).square().mean().backward()
        opt.step()
    assert {id(p) for p in opt.state} == in_opt  # momentum buffers for the trained alone
    after = model.state_dict()
    for k, v in before.items():
        same = torch.equal(v, after[k])
        assert same != (k in train), k
    c = counts(model)
    assert c["trainable_params"] == sum(model.get_parameter(n).numel() for n in train)
    assert 0 < c["trainable_fraction"] < 0.1


def test_frozen_batchnorm_keeps_its_statistics(tmp_path):
    """A frozen timm ResNet: its batch norms stay in eval mode, statistics untouched."""
    pytest.importorskip("timm")
    cfg = TrainConfig(
        model="timm:resnet10t", data="sample", epochs=1, batch_size=50, limit_train=100,
        limit_test=50, device="cpu", shift="channel", scale="channel", train_only="ss,head",
        name="bn", placement="ssf",
    )  # fmt: skip
    base = build_base(cfg, 10, (3, 32, 32))
    state = {k: v.clone() for k, v in base.state_dict().items()}
    Trainer(cfg, tmp_path / "bn", base=base).run()
    trained = load_file(tmp_path / "bn" / "model.safetensors")
    adapter = load_file(tmp_path / "bn" / "adapter.safetensors")
    assert {"fc.weight", "fc.bias"} <= set(adapter)
    assert not any(".bn" in k or k.startswith("bn") for k in adapter)
    for k, v in state.items():
        if k in trained and k not in adapter:
            assert torch.equal(v, trained[k]), k
    assert sum(k.endswith("running_mean") for k in trained if k not in adapter) > 5


# --- weights from a file ----------------------------------------------------------------------


def test_init_from_errors_and_new_head(tmp_path, capsys):
    cfg, base = mlp()
    state = base.state_dict()
    good = tmp_path / "good.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, good)
    cfg2, loaded = mlp(init_from=str(good), seed=5)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k
    bad = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in list(state.items())[1:]}, bad)
    with pytest.raises(TrainError, match="1 missing"):
        mlp(init_from=str(bad))
    (tmp_path / "w.pth").write_bytes(b"\x80\x04")
    with pytest.raises(TrainError, match="not a .safetensors"):
        mlp(init_from=str(tmp_path / "w.pth"))
    # a head for 7 classes: re-initialised in a 10-class model, and said so
    seven = TrainConfig(model="mlp", model_args={"hidden": (16, 8), "num_classes": 7})
    other = build_base(seven, 7, (3, 32, 32))
    path = tmp_path / "seven.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, path)
    _, ten = mlp(init_from=str(path))
    loaded_names, notes = ten._surgeon_init_from
    assert any("re-initialised" in n for n in notes)
    assert len(loaded_names) == len(other.state_dict()) - 2
    rc, _, err = cli(
        capsys, "train", "--model", "mlp", "--data", "sample", "--epochs", "1",
        "--init-from", bad, "--out", tmp_path / "runs", *SMALL,
    )  # fmt: skip
    assert rc == 2 and "missing" in one_line_error(err)


def test_ssf_placement_and_init():
    cfg, base = mlp(shift="channel", scale="channel", placement="ssf", ssf_init_std=0.02)
    model = derive(base, cfg, (3, 32, 32))
    rec = json.loads(json.dumps(record_of(model).to_dict()))
    assert rec["passes"][-1]["placement"] == "ssf"
    ss = [m for m in model.modules() if isinstance(m, ShiftScale)]
    linears = [m for m in base.modules() if isinstance(m, nn.Linear)]
    assert len(ss) == len(linears) - 1  # after every linear but the classifier
    assert all(not torch.all(m.scale == 1) for m in ss)
    again = derive(base, cfg, (3, 32, 32))  # the init is drawn from the seed
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


# --- the done-when check ---------------------------------------------------------------


def test_done_when_adapter_and_fold(tmp_path, capsys):
    base_dir, out = tmp_path / "base", tmp_path / "out"
    common = ["--model", "mlp", "--data", "sample", "--epochs", "1", *SMALL]
    rc, _, err = cli(capsys, "train", *common, "--out", base_dir, "--name", "b")
    assert rc == 0, err
    base_file = base_dir / "b" / "model.safetensors"
    rc, out_text, err = cli(
        capsys, "train", *common, "--train-only", "ss,head", "--init-from", base_file,
        "--out", out, "--name", "ft",
    )  # fmt: skip
    assert rc == 0, err
    assert "trainable:" in out_text + err
    run = out / "ft"
    summary = json.loads((run / "summary.json").read_text())
    assert 0 < summary["trainable_fraction"] < 0.01
    base_w, ft_w = load_file(base_file), load_file(run / "model.safetensors")
    adapter = load_file(run / "adapter.safetensors")
    inserted = {
        s["module"] for s in json.loads((base_dir / "b" / "surgery.json").read_text())["sites"]
    }
    frozen = [k for k in ft_w if k not in adapter]
    assert frozen and not any(k.split(".")[0] in inserted for k in frozen)
    for k in frozen:
        assert torch.equal(ft_w[k], base_w[k]), k  # bit for bit
    size = (run / "adapter.safetensors").stat().st_size
    assert size < 0.1 * (run / "model.safetensors").stat().st_size
    merged = tmp_path / "merged"
    rc, _, err = cli(capsys, "fold", run, "--base", base_file, "-o", merged)
    assert rc == 0, err
    plain = surgeon.load(merged).eval()
    assert not any(isinstance(m, ShiftScale) for m in plain.modules())
    trained = surgeon.load(run, base=base_file).eval()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain(x), trained(x), atol=1e-5)
        assert trained(x).argmax(1).tolist() == plain(x).argmax(1).tolist()


def test_resume_a_frozen_run_bit_exact(tmp_path):
    """A ``--train-only`` run killed after step 2 and resumed ends where an unbroken one does."""
    from surgeon.train import resume

    kw = dict(
        model="mlp", model_args={"hidden": (16,)}, data="sample", epochs=2, batch_size=50,
        limit_train=100, limit_test=50, device="cpu", shift="channel", scale="channel",
        train_only="ss,head", checkpoint_every=1,
    )  # fmt: skip
    Trainer(TrainConfig(**kw, name="a"), tmp_path / "a").run()
    Trainer(TrainConfig(**kw, name="b"), tmp_path / "b", stop_at_step=2).run()
    resume(tmp_path / "b")
    a, b = (load_file(tmp_path / n / "model.safetensors") for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    adapter = set(load_file(tmp_path / "b" / "adapter.safetensors"))
    ss = {k for k in a if k.startswith("ss_")}
    head = {k.rsplit(".", 1)[0] for k in adapter - ss}
    assert ss <= adapter and len(adapter - ss) == 2 and len(head) == 1
