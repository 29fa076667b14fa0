"""The eager fallback for models torch.fx cannot trace: module-level sites after activation
modules and on the input, identity at init, gradients, save/load, strip, the CLI's one line."""

from __future__ import annotations

import json
import textwrap
import warnings

import pytest
import torch
from surgeon_cli.app import app
from typer.testing import CliRunner

import surgeon
from surgeon.errors import TraceError

pytestmark = pytest.mark.usefixtures("seeded", "one_thread")

MODEL_FILE = textwrap.dedent(
    '''
    import torch
    import torch.nn.functional as F
    from torch import nn


    class Branchy(nn.Module):
        """Data-dependent control flow in forward: torch.fx cannot trace it."""

        input_size = (3, 8, 8)

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.act = nn.ReLU()
            self.body = nn.Sequential(nn.Conv2d(6, 6, 1), nn.ReLU(inplace=True), nn.Conv2d(6, 6, 1))
            self.fc = nn.Linear(6, 3)
            self.head_act = nn.Sigmoid()

        def forward(self, x):
            x = self.act(self.conv(x))
            if x.sum() > 0:
                x = self.body(x)
            x = F.gelu(x)  # a function: the fallback cannot reach it
            return self.head_act(self.fc(x.mean((2, 3))))  # final: no site


    def build_model():
        return Branchy()
    '''
)


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "branchy.py"
    path.write_text(MODEL_FILE)
    return path


def _insert(model, *args, **kwargs):
    with pytest.warns(UserWarning, match=r"cannot trace Branchy .*method: eager"):
        return surgeon.insert(model, *args, fallback="auto", **kwargs)


def test_fx_cannot_trace_it(model_path) -> None:
    model = surgeon.build_model(str(model_path))
    with pytest.raises(TraceError, match="control flow"):
        surgeon.insert(model, fallback="never")


def test_the_fallback_covers_the_activation_modules(model_path) -> None:
    model = surgeon.build_model(str(model_path))
    gm = _insert(model, "channel", "channel")
    rec = gm.surgeon_record.to_dict()
    assert type(gm).__name__ == "Branchy" and rec["method"] == "eager"
    assert [(s["name"], s["kind"], s["module"]) for s in rec["sites"]] == [
        ("x", "input", "ss_x"),
        ("act", "activation", "act.ss"),
        ("body.1", "activation", "body.1.ss"),
    ]
    assert rec["sites"][2]["shape"] == [-1, 6, 8, 8] and rec["sites"][2]["channel_dim"] == 1
    assert [f["name"] for f in rec["finals"]] == ["head_act"]
    (unreached,) = rec["unreached"]
    assert unreached["target"] == "F.gelu" and "function" in unreached["reason"]
    assert any("cannot trace Branchy" in w for w in rec["warnings"])
    assert surgeon.find_sites(model, fallback="auto")[1].name == "act"


@pytest.mark.parametrize(("shift", "scale"), [("channel", "channel"), ("element", "layer")])
def test_identity_and_gradients(model_path, max_abs_diff, params_without_grad, shift, scale):
    model = surgeon.build_model(str(model_path))
    gm = _insert(model, shift, scale)
    x = torch.randn(4, 3, 8, 8)
    assert max_abs_diff(model, gm, x) == 0.0
    assert params_without_grad(gm, x) == []
    assert model.act._forward_hooks == {}  # the caller's model is untouched


def test_save_load_round_trip(model_path, tmp_path) -> None:
    model = surgeon.build_model(str(model_path))
    gm = _insert(model, "channel", "layer")
    with torch.no_grad():
        for m in surgeon.inserted_modules(gm).values():
            m.shift.uniform_(-0.5, 0.5)
    surgeon.save(gm, tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "surgery.json").read_text())
    assert saved["method"] == "eager" and saved["passes"][-1]["fallback"] == "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # replayed as asked: eager, without the fallback warning
        loaded = surgeon.load(tmp_path / "saved", trust_code=True)  # a model file
    assert loaded.surgeon_record.to_dict()["method"] == "eager"
    x = torch.randn(2, 3, 8, 8)
    gm.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))
        assert not torch.equal(gm(x), model.eval()(x))


def test_strip_gives_back_the_original(model_path, max_abs_diff) -> None:
    model = surgeon.build_model(str(model_path))
    gm = _insert(model, "layer", "layer")
    with torch.no_grad():
        gm.act.ss.shift.fill_(1.0)
    plain = surgeon.strip(gm)
    assert not any(isinstance(m, surgeon.ShiftScale) for m in plain.modules())
    assert max_abs_diff(model, plain, torch.randn(2, 3, 8, 8)) == 0.0


def test_eager_can_be_asked_for_on_a_traceable_model(max_abs_diff) -> None:
    model = surgeon.build_model("allconv", {"width": 0.25})
    gm = surgeon.insert(model, "channel", "channel", input_size="3,32,32", fallback="eager")
    fx_sites = surgeon.find_sites(model, input_size="3,32,32")
    assert gm.surgeon_record.to_dict()["method"] == "eager"
    assert len(gm.surgeon_record.to_dict()["sites"]) == len(fx_sites)
    assert max_abs_diff(model, gm, torch.randn(2, 3, 32, 32)) == 0.0
    with pytest.raises(surgeon.SurgeonError, match="invalid fallback"):
        surgeon.insert(model, fallback="sometimes")


def test_the_cli_says_which_method_in_one_line(model_path) -> None:
    result = CliRunner().invoke(app, ["insert", str(model_path), "--json", "--fallback", "auto"])
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    assert obj["method"] == "eager" and obj["max_abs_diff_at_init"] == 0.0
    assert [u["target"] for u in obj["unreached"]] == ["F.gelu"]
    (warned,) = [line for line in result.stderr.splitlines() if "cannot trace" in line]
    assert warned.startswith("warning:") and warned.endswith("(method: eager)")
    default = CliRunner().invoke(app, ["insert", str(model_path), "--json"])  # auto
    assert default.exit_code == 0 and json.loads(default.stdout)["method"] == "eager"
    never = CliRunner().invoke(app, ["insert", str(model_path), "--fallback", "never"])
    assert never.exit_code != 0
