"""surgeon.fold / `surgeon fold`: exact wherever it folds, left in place (with a reason)
wherever folding would not be exact, and saved/loaded like any surgered model."""

from __future__ import annotations

import pytest
import torch
from surgeon_cli.app import main
from torch import nn

import surgeon
from surgeon.errors import SurgeryError
from surgeon.layers import ShiftScale
from surgeon.tracing import trace


@pytest.fixture(autouse=True)
def _threads(one_thread):
    torch.manual_seed(0)


def randomise(model: nn.Module, scale: float = 0.5) -> nn.Module:
    """Shift/scale values away from the identity (and no zeros), so folding is tested."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ShiftScale):
                if m.shift is not None:
                    m.shift.copy_(torch.randn_like(m.shift) * scale)
                if m.scale is not None:
                    m.scale.copy_(1 + torch.rand_like(m.scale) * scale)
    return model


class Seq(nn.Module):
    """The given layers in a row (a ShiftScale among them is a leaf of the tracer)."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def ss(shift: str, scale: str, shape, channel_dim: int = 1) -> ShiftScale:
    return ShiftScale(shift, scale, shape, channel_dim)


def folded(model: nn.Module, size, train_check: bool = True):
    """Fold a traced, randomised ``model``; assert exactness in eval (and train) mode."""
    gm = randomise(trace(model))
    out, report = surgeon.fold(gm, input_size=size)
    x = torch.randn(3, *size)
    for mode in (False, True) if train_check else (False,):
        gm.train(mode)
        out.train(mode)
        torch.manual_seed(1)
        a = gm(x)
        torch.manual_seed(1)
        b = out(x)
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (mode, (a - b).abs().max())
    return out, report


def left(out: nn.Module) -> list[ShiftScale]:
    return [m for m in out.modules() if isinstance(m, ShiftScale)]


# ---------------------------------------------------------------- folded, exactly


@pytest.mark.parametrize("shift, scale", [("layer", "layer"), ("channel", "channel"),
                                          ("none", "channel"), ("channel", "layer"), ("layer", "none")])  # fmt: skip
@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, 3),  # unpadded 3x3
        nn.Conv2d(4, 6, 1, bias=False),  # 1x1 without bias: the shift adds one
        nn.Conv2d(4, 6, 3, stride=2, groups=2),  # grouped
        nn.Conv2d(4, 4, 3, groups=4),  # depthwise
        nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),  # reflect padding commutes
    ],
    ids=["3x3", "1x1-nobias", "grouped", "depthwise", "reflect"],
)
def test_into_following_conv(conv, shift, scale):
    out, report = folded(Seq(ss(shift, scale, (4, 7, 7)), conv), (4, 7, 7))
    (e,) = report.entries
    assert (e.action, e.direction, e.into) == ("folded", "following", ["layers.1"])
    assert not left(out) and report.modules_after < report.modules_before


@pytest.mark.parametrize("shift, scale", [("layer", "layer"), ("channel", "channel"), ("element", "element")])  # fmt: skip
def test_into_following_linear(shift, scale):
    out, report = folded(Seq(ss(shift, scale, (5,)), nn.Linear(5, 3)), (5,))
    assert report.entries[0].action == "folded" and not left(out)


@pytest.mark.parametrize("shift, scale", [("channel", "channel"), ("element", "element")])
def test_through_flatten_into_linear(shift, scale):
    """An NCHW map (even per element) flattened into a Linear's input features."""
    model = Seq(ss(shift, scale, (2, 3, 3)), nn.Flatten(), nn.Dropout(0.0), nn.Linear(18, 4))
    out, report = folded(model, (2, 3, 3))
    assert report.entries[0].action == "folded"


def test_through_global_pooling_into_linear():
    model = Seq(ss("channel", "channel", (3, 4, 4)), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))  # fmt: skip
    out, report = folded(model, (3, 4, 4))
    assert report.entries[0].action == "folded"


@pytest.mark.parametrize("shift, scale", [("layer", "layer"), ("channel", "channel")])
@pytest.mark.parametrize(
    "layer, size",
    [
        (nn.Conv2d(3, 4, 3, padding=1), (3, 6, 6)),  # a padded conv is fine before the map
        (nn.Conv2d(3, 4, 3, bias=False), (3, 6, 6)),
        (nn.Linear(5, 4), (5,)),
    ],
    ids=["conv", "conv-nobias", "linear"],
)
def test_into_preceding_layer(layer, size, shift, scale):
    shape = (4, 6, 6) if isinstance(layer, nn.Conv2d) and layer.padding == (1, 1) else None
    shape = shape or ((4, 4, 4) if isinstance(layer, nn.Conv2d) else (4,))
    out, report = folded(Seq(layer, nn.Identity(), ss(shift, scale, shape), nn.ReLU()), size)
    (e,) = report.entries
    assert (e.action, e.direction, e.into) == ("folded", "preceding", ["layers.0"])


def test_into_preceding_batchnorm_in_both_modes():
    """BN's gamma/beta absorb the map; exact with batch statistics (train) and running ones."""
    model = Seq(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), ss("channel", "channel", (4, 5, 5)), nn.ReLU())  # fmt: skip
    out, report = folded(model, (3, 5, 5))
    assert report.entries[0].into == ["layers.1"]


def test_scale_only_before_a_zero_padded_conv_is_exact():
    out, report = folded(Seq(nn.ReLU(), ss("none", "channel", (3, 5, 5)), nn.Conv2d(3, 4, 3, padding=1)), (3, 5, 5))  # fmt: skip
    assert report.entries[0].action == "folded" and not left(out)


def test_several_foldable_users_all_absorb_it():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.ss = ss("layer", "layer", (3, 5, 5))
            self.a, self.b = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 3)

        def forward(self, x):
            x = self.ss(torch.relu(x))
            return self.a(x)[..., 1:-1, 1:-1] + self.b(x)

    out, report = folded(Two(), (3, 5, 5))
    assert sorted(report.entries[0].into) == ["a", "b"] and not left(out)


# ---------------------------------------------------------------- partly folded or kept


def test_shift_before_a_zero_padded_conv_stays():
    model = Seq(nn.ReLU(), ss("layer", "layer", (3, 5, 5)), nn.Conv2d(3, 4, 3, padding=1))
    out, report = folded(model, (3, 5, 5))
    (e,) = report.entries
    assert e.action == "scale folded" and "pads with zeros" in e.reason
    (rest,) = left(out)
    assert rest.scale is None and rest.shift is not None  # only the shift is left


def test_element_mode_does_not_fold_into_a_conv():
    model = Seq(nn.ReLU(), ss("element", "element", (3, 5, 5)), nn.Conv2d(3, 4, 3))
    out, report = folded(model, (3, 5, 5))
    (e,) = report.entries
    assert e.action == "kept" and "element mode" in e.reason
    assert len(left(out)) == 1 and report.modules_after == report.modules_before


def test_a_user_that_is_not_a_layer_keeps_the_module():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.ss, self.conv = ss("channel", "channel", (3, 5, 5)), nn.Conv2d(3, 3, 1)

        def forward(self, x):
            x = self.ss(torch.relu(x))
            return self.conv(x) + x

    out, report = folded(Residual(), (3, 5, 5))
    (e,) = report.entries
    assert e.action == "kept" and "not a Linear or conv" in e.reason


def test_a_shift_does_not_cross_dropout():
    """Exact in train mode too: the dropout masks are the same with the same seed."""
    model = Seq(nn.ReLU(), ss("layer", "layer", (5,)), nn.Dropout(0.5), nn.Linear(5, 2))
    out, report = folded(model, (5,))
    assert report.entries[0].action == "scale folded"
    assert "dropout" in report.entries[0].reason


def test_non_finite_values_are_refused_before_any_change():
    gm = randomise(trace(Seq(ss("layer", "layer", (5,)), nn.Linear(5, 2))))
    with torch.no_grad():
        gm.get_submodule("layers.0").scale.fill_(float("nan"))
    with pytest.raises(SurgeryError, match="non-finite"):
        surgeon.fold(gm, input_size=(5,))


def test_fold_needs_a_graph_module():
    with pytest.raises(SurgeryError, match="GraphModule"):
        surgeon.fold(nn.Linear(2, 2))


# ---------------------------------------------------------------- surgered models, save/load


def test_allconv_counts_and_record():
    base = surgeon.build_model("allconv", {"width": 0.125})
    gm = randomise(surgeon.insert(base, "layer", "layer"))
    out, report = surgeon.fold(gm)
    # the three sites before unpadded convs fold; the six before padded 3x3 convs keep a shift
    assert (report.count("folded"), report.count("scale folded"), report.count("kept")) == (3, 6, 0)
    assert report.max_abs_diff < 1e-5 * max(1.0, report.max_abs_output)
    assert out.surgeon_record.to_dict()["passes"][-1]["name"] == "fold"
    assert set(surgeon.inserted_modules(out)) == set(
        out.surgeon_record.to_dict()["fold"]["scale_folded"]
    )
    assert (
        gm.surgeon_record.to_dict()["passes"][-1]["name"] == "shift_scale"
    )  # the input is untouched


def test_save_load_round_trip(tmp_path):
    base = surgeon.build_model("mlp", {"hidden": (16, 8)})
    gm = randomise(surgeon.insert(base, "channel", "channel"))
    out, report = surgeon.fold(gm)
    assert report.count("folded") == 3 and not left(out)
    surgeon.save(out, tmp_path / "f")
    back = surgeon.load(tmp_path / "f")
    assert not left(back)
    x = torch.randn(4, 3, 32, 32)
    out.eval()
    assert torch.equal(back(x), out(x))
    assert torch.allclose(back(x), gm.eval()(x), atol=1e-5)


# ---------------------------------------------------------------- CLI


def test_cli_fold(tmp_path, capsys):
    src, dst = tmp_path / "m", tmp_path / "f"
    assert main(["insert", "allconv", "--model-arg", "width=0.125", "-o", str(src), "--json"]) == 0
    capsys.readouterr()
    assert main(["fold", str(src), "-o", str(dst)]) == 0
    text = capsys.readouterr().out
    assert "max |Δoutput|" in text and "3 folded, 6 scale-only, 0 kept" in text
    assert (dst / "model.safetensors").is_file()
    assert surgeon.load(dst).surgeon_record.to_dict()["passes"][-1]["name"] == "fold"


@pytest.mark.parametrize("make", ["missing", "empty", "not_json"])
def test_cli_fold_bad_folder(tmp_path, capsys, make):
    folder = tmp_path / "bad"
    if make != "missing":
        folder.mkdir()
    if make == "not_json":
        (folder / "surgery.json").write_text("{oops")
    assert main(["fold", str(folder), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and "hint:" in err
    assert not (tmp_path / "out").exists()


def test_inspect_params_refuses_a_folded_model_clearly(tmp_path) -> None:
    from surgeon_cli.app import main

    import surgeon

    gm = surgeon.insert(surgeon.build_model("allconv", {"width": 0.25}), "none", "channel")
    surgeon.save(surgeon.fold(gm)[0], tmp_path / "folded")
    assert main(["inspect-params", str(tmp_path / "folded")]) == 2
