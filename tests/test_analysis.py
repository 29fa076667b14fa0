"""surgeon.analysis and `surgeon inspect-params`: statistics, comparison, JSON, plots, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image as mpimg
import pytest
import torch
import typer
from safetensors.torch import save_file
from surgeon_cli.common import report_error
from surgeon_cli.inspect import inspect_params_command

import surgeon
from surgeon import analysis
from surgeon.errors import AnalysisError, SurgeonError

MODEL_ARGS = {"hidden": [8, 6], "input_size": [1, 4, 4], "num_classes": 3}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def surgered(shift: str = "layer", scale: str = "layer", model_args=None, **kwargs):
    torch.manual_seed(0)
    base = surgeon.build_model("mlp", dict(model_args or MODEL_ARGS))
    return surgeon.insert(base, shift, scale, **kwargs)


def set_params(gm, values: dict[str, torch.Tensor]) -> None:
    """``values``: ``"<module>.shift"`` -> tensor."""
    with torch.no_grad():
        for key, v in values.items():
            module, name = key.rsplit(".", 1)
            getattr(gm.get_submodule(module), name).copy_(v)


def snapshot(gm) -> dict[str, torch.Tensor]:
    return {
        f"{m}.{p}": getattr(mod, p).detach().clone()
        for m, mod in surgeon.inserted_modules(gm).items()
        for p in ("shift", "scale")
        if getattr(mod, p) is not None
    }


def make_run(
    root: Path,
    name: str,
    *,
    shift: str = "layer",
    scale: str = "layer",
    seed: int = 0,
    lr: float = 0.04,
    epochs: int = 3,
    drift: int | None = None,
    model_args=None,
) -> Path:
    """A run folder as `surgeon train` writes it, with shift/scale values that drift from
    identity (a direction drawn from ``drift``, default ``seed``) linearly over epochs."""
    gm = surgered(shift, scale, model_args)
    init = snapshot(gm)
    g = torch.Generator().manual_seed(1000 + (seed if drift is None else drift))
    delta = {k: torch.randn(v.shape, generator=g) * 0.5 for k, v in init.items()}
    run = root / name
    states = [{k: init[k] + delta[k] * e / epochs for k in init} for e in range(epochs + 1)]
    set_params(gm, states[-1])
    surgeon.save(gm, run)
    variant = "+".join(f"{p}-{m}" for p, m in (("shift", shift), ("scale", scale)) if m != "none")
    config = {"name": name, "variant": variant or "plain", "model": "mlp", "lr": lr, "seed": seed,
              "epochs": epochs, "ema": 0.9}  # fmt: skip
    (run / "config.json").write_text(json.dumps(config))
    (run / "snapshots").mkdir()
    for e, state in enumerate(states):
        save_file({k: v.contiguous() for k, v in state.items()}, str(run / "snapshots" / f"epoch_{e:04d}.safetensors"))  # fmt: skip
    rows = []
    for e in range(epochs):
        for s in range(1, 5):
            step = 4 * e + s
            rows.append({"type": "step", "step": step, "epoch": e, "loss": 2.0 / step, "ema_loss": 2.0 / step, "lr": lr})  # fmt: skip
        rows.append({"type": "epoch", "epoch": e + 1, "step": 4 * (e + 1), "val_err": 0.5 - 0.1 * e, "train_err": 0.4 - 0.1 * e})  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"name": name, "variant": config["variant"], "lr": lr, "seed": seed, "status": "ok",
               "final_val_err": 0.3, "best_val_err": 0.3, "best_epoch": epochs, "epochs_run": epochs,
               "diverged_at_step": None, "message": None}  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "a": make_run(root, "a", seed=0),
        "a_copy": make_run(root, "a_copy", seed=0),
        "b": make_run(root, "b", seed=1),
        "channel": make_run(root, "channel", shift="channel", scale="channel", seed=2),
        "element": make_run(root, "element", shift="element", scale="element", seed=3),
    }


# ----------------------------------------------------------------- statistics


def test_tensor_stats_hand_computed():
    st = analysis.tensor_stats(torch.tensor([1.0, 2, 3, 4, -1, -2, 0, 5]), negative=True)
    assert st["mean"] == pytest.approx(1.5)
    assert st["std"] == pytest.approx(math.sqrt(42 / 8))  # population std
    assert (st["min"], st["max"], st["numel"]) == (-2.0, 5.0, 8)
    assert st["frac_negative"] == pytest.approx(0.25)
    assert "value" not in st
    one = analysis.tensor_stats(torch.tensor(-0.75), negative=True)
    assert one == {"mean": -0.75, "std": 0.0, "min": -0.75, "max": -0.75, "value": -0.75,
                   "frac_negative": 1.0, "numel": 1}  # fmt: skip


def test_tensor_stats_skips_nonfinite():
    st = analysis.tensor_stats(torch.tensor([1.0, float("nan"), 3.0, float("inf")]))
    assert st["mean"] == pytest.approx(2.0) and st["nonfinite"] == 2
    assert analysis.jsonable({"x": [float("nan"), 1.0, float("-inf")]}) == {"x": [None, 1.0, None]}


def test_pearson_hand_computed():
    # dx = [-1, 0, 1], dy = [-7/3, -1/3, 8/3]: r = 5 / sqrt(2 * 114/9)
    assert analysis.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    assert analysis.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert analysis.pearson([1, 2, 3], [1, 2, 3]) == 1.0
    assert analysis.pearson([1, 1, 1], [1, 2, 3]) is None  # constant side: undefined
    assert analysis.pearson([1.0], [2.0]) is None


def test_site_stats_hand_computed(tmp_path):
    gm = surgered("channel", "channel")
    scale = torch.tensor([1.0, 2, 3, 4, -1, -2, 0, 5])
    shift = torch.full((8,), 0.5)
    set_params(gm, {"ss_layers_3.scale": scale, "ss_layers_3.shift": shift})
    surgeon.save(gm, tmp_path / "m")
    target = analysis.load_target(tmp_path / "m")
    assert target.kind == "model" and target.variant == "shift-channel+scale-channel"
    res = analysis.inspect([target])
    site = next(s for s in res["sites"] if s["name"] == "layers_3")
    assert site["mode"] == "shift-channel+scale-channel"
    assert site["shape"] == [-1, 8] and site["kind"] == "activation"
    sc = site["scale"]
    assert sc["mode"] == "channel"
    assert sc["mean"] == pytest.approx(1.5) and sc["std"] == pytest.approx(math.sqrt(5.25))
    assert (sc["min"], sc["max"], sc["frac_negative"]) == (-2.0, 5.0, 0.25)
    assert site["shift"]["mean"] == pytest.approx(0.5) and site["shift"]["std"] == 0.0
    # y = (x + 0.5) * s = s*x + 0.5*s: b = 0.5 * scale
    aff = site["affine"]
    assert aff["a"]["mean"] == pytest.approx(1.5)
    assert aff["b"]["mean"] == pytest.approx(0.75)
    assert (aff["b"]["min"], aff["b"]["max"]) == (-1.0, 2.5)
    assert aff["a"]["frac_negative"] == 0.25


def test_layer_mode_value_and_formula(tmp_path):
    gm = surgered("layer", "layer")
    set_params(
        gm, {"ss_layers_5.shift": torch.tensor(-0.5), "ss_layers_5.scale": torch.tensor(2.0)}
    )
    surgeon.save(gm, tmp_path / "m")
    res = analysis.inspect([analysis.load_target(tmp_path / "m")])
    site = next(s for s in res["sites"] if s["name"] == "layers_5")
    assert site["shift"]["value"] == -0.5 and site["scale"]["value"] == 2.0
    assert site["scale"]["frac_negative"] == 0.0
    assert site["affine"]["a"]["value"] == 2.0 and site["affine"]["b"]["value"] == -1.0
    assert site["affine"]["text"] == "y = 2*x - 1"


def test_scale_only_has_no_shift(tmp_path):
    surgeon.save(surgered("none", "element"), tmp_path / "m")
    res = analysis.inspect([analysis.load_target(tmp_path / "m")])
    for s in res["sites"]:
        assert s["shift"] is None and s["scale"]["mode"] == "element"
        assert s["scale"]["numel"] == math.prod(s["shape"][1:])
        assert s["affine"]["b"]["max"] == 0.0


# ----------------------------------------------------------------- targets


def test_target_kinds(runs):
    run = analysis.load_target(runs["a"])
    assert run.kind == "run" and run.label == "a" and run.seed == 0
    assert [e for e, _ in run.snapshots()] == [0, 1, 2, 3]
    snap = analysis.load_target(runs["a"] / "snapshots" / "epoch_0000.safetensors")
    assert snap.kind == "snapshot" and snap.epoch == 0 and snap.label == "a@epoch0"
    for t in snap.tensors.values():  # epoch 0 is the identity
        assert torch.all((t == 0) | (t == 1))
    final = analysis.load_target(runs["a"] / "model.safetensors")
    assert final.kind == "run"
    last = analysis.load_target(runs["a"] / "snapshots" / "epoch_0003.safetensors")
    for k, v in final.tensors.items():
        assert torch.equal(v, last.tensors[k])


def test_checkpoint_target(runs, tmp_path):
    ckpt = runs["b"] / "checkpoints" / "step_00000012"
    ckpt.mkdir(parents=True)
    tensors = {"extra.weight": torch.zeros(2)}
    tensors.update(
        {f"_orig_mod.{k}": v for k, v in analysis.load_target(runs["b"]).tensors.items()}
    )
    save_file(tensors, str(ckpt / "model.safetensors"))
    (runs["b"] / "checkpoints" / "latest.json").write_text(
        json.dumps({"checkpoint": ckpt.name, "step": 12})
    )
    for path in (ckpt, runs["b"] / "checkpoints"):
        t = analysis.load_target(path)
        assert t.kind == "checkpoint" and t.label == "b:step_00000012"
        assert t.tensors.keys() == analysis.load_target(runs["b"]).tensors.keys()


def test_duplicate_labels_are_made_unique(runs):
    targets = analysis.load_targets([runs["a"], runs["a"]])
    assert len({t.label for t in targets}) == 2


# ----------------------------------------------------------------- comparison


def test_identical_runs_correlate_perfectly(runs):
    res = analysis.inspect(analysis.load_targets([runs["a"], runs["a_copy"]]))
    comp = res["comparison"]
    (pair,) = comp["pairs"]
    assert pair["same_seed"] is True and pair["same_variant"] is True
    for name in ("shift", "scale"):
        assert pair[name]["correlation"] == 1.0
        assert pair[name]["elementwise_correlation"] is None  # layer mode: one value per site
        assert pair[name]["max_abs_diff"] == 0.0 and pair[name]["mean_abs_diff"] == 0.0
        for s in comp["sites"]:
            assert s[name]["diff"] == [0.0, 0.0]
            assert s[name]["spread"] == 0.0 and s[name]["max_abs_diff"] == 0.0
        assert comp["summary"][name]["mean_correlation_same_seed"] == 1.0
        assert comp["summary"][name]["mean_correlation_different_seed"] is None


def test_identical_channel_runs(runs):
    comp = analysis.compare(analysis.load_targets([runs["channel"], runs["channel"]]))
    (pair,) = comp["pairs"]
    assert pair["scale"]["elementwise_correlation"] == 1.0
    assert pair["shift"]["elementwise_correlation"] == 1.0
    for s in comp["sites"]:
        if s["name"] != "x":  # the input has one channel: one value, no correlation
            assert s["scale"]["correlation_with_reference"] == [1.0, 1.0]
        assert s["scale"]["elementwise_spread"] == 0.0


def test_elementwise_correlation_is_within_sites(runs):
    a, b = analysis.load_targets([runs["channel"], runs["channel"]])
    b.tensors = {k: -v for k, v in b.tensors.items()}  # every site anti-correlated
    (pair,) = analysis.compare([a, b])["pairs"]
    assert pair["scale"]["elementwise_correlation"] == pytest.approx(-1.0)


def test_comparison_values_and_spread(runs):
    targets = analysis.load_targets([runs["a"], runs["b"], runs["a_copy"]])
    comp = analysis.compare(targets)
    assert comp["reference"] == "a" and len(comp["pairs"]) == 3
    for j, s in enumerate(comp["sites"]):
        site = targets[0].sites[j]
        values = [t.param(t.sites[j], "scale").item() for t in targets]
        assert s["scale"]["values"] == pytest.approx(values)
        assert s["scale"]["diff"] == pytest.approx([v - values[0] for v in values])
        assert s["scale"]["spread"] == pytest.approx(torch.tensor(values).double().std().item())
        assert s["name"] == site["name"]
    ab = comp["pairs"][0]
    assert (ab["a"], ab["b"], ab["same_seed"]) == ("a", "b", False)
    ma = [t.item() for t in (targets[0].param(s, "scale") for s in targets[0].sites)]
    mb = [t.item() for t in (targets[1].param(s, "scale") for s in targets[1].sites)]
    assert ab["scale"]["correlation"] == pytest.approx(analysis.pearson(ma, mb))
    assert comp["summary"]["scale"]["mean_correlation_different_seed"] == pytest.approx(
        (analysis.pearson(ma, mb) * 2) / 2
    )


def test_json_schema_several_targets(runs):
    res = analysis.inspect(analysis.load_targets([runs["channel"], runs["channel"]]), epochs=True)
    assert set(res) == {"targets", "sites", "comparison", "trajectories"}
    for t in res["targets"]:
        assert {"label", "path", "kind", "model", "variant", "shift_mode", "scale_mode", "seed", "lr", "epoch", "n_sites"} <= set(t)  # fmt: skip
    for s in res["sites"]:
        assert {
            "name",
            "kind",
            "mode",
            "index",
            "shape",
            "shift",
            "scale",
            "affine",
            "per_target",
        } <= set(s)
        assert {"mean", "std", "min", "max"} <= set(s["shift"])
        assert {"mean", "std", "min", "max", "frac_negative"} <= set(s["scale"])
        assert len(s["per_target"]) == 2
    assert {"reference", "sites", "pairs", "summary"} <= set(res["comparison"])
    json.dumps(analysis.jsonable(res), allow_nan=False)


def test_trajectories(runs):
    target = analysis.load_target(runs["a"])
    traj = analysis.trajectory(target)
    assert traj["epochs"] == [0, 1, 2, 3]
    for s, site in zip(traj["sites"], target.sites):
        assert s["scale"]["mean"][0] == 1.0 and s["shift"]["mean"][0] == 0.0
        assert s["scale"]["mean"][-1] == pytest.approx(target.param(site, "scale").item())
        # the fixture drifts linearly: the middle epochs lie on the line
        first, last = s["scale"]["mean"][0], s["scale"]["mean"][-1]
        assert s["scale"]["mean"][1] == pytest.approx(first + (last - first) / 3, abs=1e-6)


def test_damaged_snapshot_is_left_out(tmp_path):
    run = make_run(tmp_path, "r", epochs=2)
    last = run / "snapshots" / "epoch_0002.safetensors"
    last.write_bytes(last.read_bytes()[:40])  # a run killed while writing it
    res = analysis.inspect([analysis.load_target(run)], epochs=True)
    assert res["trajectories"][0]["epochs"] == [0, 1]
    assert "unreadable snapshot" in res["warnings"][0]
    with pytest.raises(AnalysisError, match="cannot read"):
        analysis.load_target(last)


def test_incompatible_targets(runs, tmp_path):
    other = make_run(tmp_path, "wide", model_args={**MODEL_ARGS, "hidden": [8, 5]})
    with pytest.raises(AnalysisError, match="different models"):
        analysis.inspect(analysis.load_targets([runs["a"], other]))
    surgeon.save(surgered(exclude=["input"]), tmp_path / "no_input")
    with pytest.raises(AnalysisError, match="different site lists"):
        analysis.inspect(analysis.load_targets([runs["a"], tmp_path / "no_input"]))


def test_modes_may_differ_between_targets(runs):
    res = analysis.inspect(analysis.load_targets([runs["a"], runs["channel"]]))
    (pair,) = res["comparison"]["pairs"]
    assert pair["same_variant"] is False and res["sites"][1]["mode"] == "mixed"
    assert pair["scale"]["elementwise_correlation"] is None  # shapes differ
    assert pair["scale"]["correlation"] is not None


# ----------------------------------------------------------------- plots


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    assert float(img[..., :3].std()) > 0, f"{path} is blank"


def test_plots(runs, tmp_path):
    targets = analysis.load_targets([runs["element"], runs["channel"], runs["a"]])
    targets = targets[:1]
    res = analysis.inspect(targets, epochs=True)
    files = analysis.plot_inspect(res, targets, tmp_path / "plots")
    names = {f.name for f in files}
    assert names == {"depth.png", "trajectory_element.png", "hist_element_shift.png", "hist_element_scale.png"}  # fmt: skip
    for f in files:
        assert_png(f)
    several = analysis.load_targets([runs["a"], runs["b"]])
    files = analysis.plot_inspect(analysis.inspect(several), several, tmp_path / "two")
    assert [f.name for f in files] == ["depth.png"]  # layer mode: no histograms
    assert_png(files[0])


def test_plots_have_axis_labels_and_a_title(runs, tmp_path, monkeypatch):
    from surgeon.analysis import plots

    drawn, save = [], plots.save
    monkeypatch.setattr(plots, "save", lambda fig, path: drawn.append((fig, path)) or save(fig, path))  # fmt: skip
    odd = make_run(tmp_path, "$\\bad{$", shift="channel", scale="channel")  # no mathtext
    for paths in ([runs["element"]], [runs["a"], runs["b"], runs["channel"]], [odd]):
        targets = analysis.load_targets(paths)
        analysis.plot_inspect(analysis.inspect(targets, epochs=True), targets, tmp_path / "p")
    assert {Path(p).name.split("_")[0] for _, p in drawn} == {"depth.png", "trajectory", "hist"}
    for fig, path in drawn:
        assert plots.missing_labels(fig) == [], path


# ----------------------------------------------------------------- CLI


def cli_app() -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command("inspect-params")(inspect_params_command)

    @app.callback()
    def _root() -> None:
        """test app"""

    return app


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Call the command like `surgeon` does: known errors -> one line on stderr, exit 2."""
    code = 0
    try:
        cli_app()(args=[str(a) for a in args], standalone_mode=False)
    except SurgeonError as exc:
        code = report_error(exc)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_json_is_one_object(runs, capsys, tmp_path):
    code, out, err = run_cli(capsys, "inspect-params", runs["a"], runs["b"], "--epochs", "--json", "--plot", tmp_path / "p")  # fmt: skip
    assert code == 0, err
    obj = json.loads(out)
    assert [t["label"] for t in obj["targets"]] == ["a", "b"]
    assert "comparison" in obj and len(obj["trajectories"]) == 2
    assert all(Path(p).is_file() for p in obj["plots"])


def test_cli_tables(runs, capsys):
    code, out, err = run_cli(capsys, "inspect-params", runs["channel"], runs["channel"] / "snapshots" / "epoch_0001.safetensors", "--epochs")  # fmt: skip
    assert code == 0, err
    assert "layers_3" in out and "channel@epoch1" in out and "correlation" in out
    assert "ep 3" in out


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("plain", "has no shift/scale sites"),
        ("models", "different models"),
        ("bad_file", "no surgery.json found above"),
    ],
)
def test_cli_errors_exit_2(case, message, runs, tmp_path, capsys):
    if case == "missing":
        args = [tmp_path / "nope"]
    elif case == "plain":
        surgeon.save(surgered("none", "none"), tmp_path / "plain")
        args = [tmp_path / "plain"]
    elif case == "models":
        args = [runs["a"], make_run(tmp_path, "wide", model_args={**MODEL_ARGS, "hidden": [4, 6]})]
    else:
        save_file({"x": torch.zeros(1)}, str(tmp_path / "loose.safetensors"))
        args = [tmp_path / "loose.safetensors"]
    code, out, err = run_cli(capsys, "inspect-params", *args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "hint: " in lines[0]


def test_epochs_without_snapshots_is_an_error(tmp_path, capsys):
    surgeon.save(surgered(), tmp_path / "m")
    code, _, err = run_cli(capsys, "inspect-params", tmp_path / "m", "--epochs")
    assert code == 2 and "no per-epoch snapshots" in err
