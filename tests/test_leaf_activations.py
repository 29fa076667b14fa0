"""Activations inside leaf modules: module-level sites (method "hybrid"), identity at init,
gradients, save/load, strip; user leaves stay opaque; timm's NFNet and MobileViT blocks."""

from __future__ import annotations

import textwrap

import pytest
import torch

import surgeon
from surgeon import registry

pytestmark = pytest.mark.usefixtures("seeded", "one_thread")

# A leaf block that hides a ReLU module, a GELU inside a Sequential and a functional softmax; the
# model file registers it as a leaf, so that load() rebuilds it the same way.
MODEL_FILE = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    import surgeon


    @surgeon.register_leaf_module
    class HiddenActBlock(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.conv1, self.act = nn.Conv2d(c, c, 3, padding=1), nn.ReLU()
            self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

        def forward(self, x):
            x = self.act(self.conv1(x))
            y = self.mlp(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            return x + y * F.softmax(y, dim=1)


    class Net(nn.Module):
        input_size = (3, 8, 8)

        def __init__(self) -> None:
            super().__init__()
            self.stem, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
            self.block = HiddenActBlock(4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.block(self.act(self.stem(x))).mean((2, 3)))


    def build_model():
        return Net()
    """
)


@pytest.fixture
def leaf_registry(monkeypatch):
    """Registrations made by a test (the model file's decorator) end with the test."""
    monkeypatch.setattr(registry, "_LEAF_MODULES", set(registry.LEAF_MODULES))


@pytest.fixture
def model_path(tmp_path, leaf_registry):
    path = tmp_path / "hidden_act.py"
    path.write_text(MODEL_FILE)
    return path


def test_a_leaf_hides_activations_that_get_module_level_sites(model_path) -> None:
    model = surgeon.build_model(str(model_path))
    sites = surgeon.find_sites(model)
    assert [(s.name, s.kind, s.target) for s in sites] == [
        ("x", "input", "input"),
        ("act", "activation", "nn.ReLU"),
        ("block.act", "activation", "nn.ReLU"),
        ("block.mlp.1", "activation", "nn.GELU"),
    ]
    by_name = {s.name: s for s in sites}
    assert by_name["block.act"].shape == (-1, 4, 8, 8) and by_name["block.act"].channel_dim == 1
    # the GELU follows a Linear on channels-last tokens: the channel is the last dim
    assert by_name["block.mlp.1"].shape == (-1, 8, 8, 8) and by_name["block.mlp.1"].channel_dim == 3
    assert by_name["block.act"].extra == {"method": "module", "scope": "block", "calls": 1}


@pytest.mark.parametrize(("shift", "scale"), [("channel", "channel"), ("element", "layer")])
def test_identity_gradients_and_the_record(
    model_path, max_abs_diff, params_without_grad, shift, scale
) -> None:
    model = surgeon.build_model(str(model_path))
    gm = surgeon.insert(model, shift, scale)
    rec = gm.surgeon_record.to_dict()
    assert rec["method"] == "hybrid" and rec["passes"][-1]["method"] == "hybrid"
    assert [s["module"] for s in rec["sites"]] == [
        "ss_x", "ss_act", "block.act.ss", "block.mlp.1.ss",
    ]  # fmt: skip
    (unreached,) = rec["unreached"]  # the functional softmax inside the leaf
    assert unreached["target"] == "F.softmax" and "HiddenActBlock" in unreached["reason"]
    x = torch.randn(3, 3, 8, 8)
    assert max_abs_diff(model, gm, x) == 0.0
    assert params_without_grad(gm, x) == []
    assert isinstance(gm.block.act, torch.nn.ReLU)  # the activation keeps its type
    shape = (8,) if shift == "channel" else (8, 8, 8)
    assert tuple(gm.block.mlp[1].ss.shift.shape) == shape


def test_save_load_round_trip_replays_the_module_level_sites(model_path, tmp_path) -> None:
    model = surgeon.build_model(str(model_path))
    gm = surgeon.insert(model, "channel", "channel")
    with torch.no_grad():
        for m in surgeon.inserted_modules(gm).values():
            m.shift.uniform_(-0.5, 0.5)
            m.scale.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8, 8)
    surgeon.save(gm, tmp_path / "saved")
    loaded = surgeon.load(tmp_path / "saved", trust_code=True)  # a model file: code
    assert loaded.surgeon_record.to_dict()["method"] == "hybrid"
    assert list(surgeon.inserted_modules(loaded)) == list(surgeon.inserted_modules(gm))
    gm.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))
        assert not torch.equal(gm(x), model.eval()(x))  # the module-level sites do act


def test_deepcopy_and_strip(model_path, max_abs_diff) -> None:
    import copy

    model = surgeon.build_model(str(model_path))
    gm = surgeon.insert(model, "layer", "layer")
    with torch.no_grad():
        gm.block.act.ss.shift.fill_(1.0)
    twin = copy.deepcopy(gm)
    with torch.no_grad():
        twin.block.act.ss.shift.fill_(2.0)  # the copy's hook applies the copy's module
    x = torch.randn(2, 3, 8, 8)
    assert max_abs_diff(gm, twin, x) > 0
    plain = surgeon.strip(gm)
    assert not any(isinstance(m, surgeon.ShiftScale) for m in plain.modules())
    assert max_abs_diff(model, plain, x) == 0.0


def test_a_class_named_with_leaf_stays_opaque(model_path) -> None:
    model = surgeon.build_model(str(model_path))
    gm = surgeon.insert(model, "layer", "layer", leaf=["HiddenActBlock"])
    rec = gm.surgeon_record.to_dict()
    assert rec["method"] == "fx"
    assert [s["name"] for s in rec["sites"]] == ["x", "act"]
    assert {u["name"] for u in rec["unreached"]} == {"block.act", "block.mlp.1", "block"}
    assert all("--leaf" in u["reason"] for u in rec["unreached"])


def test_a_model_without_leaves_keeps_the_plain_fx_result() -> None:
    gm = surgeon.insert(surgeon.build_model("allconv", {"width": 0.25}), "layer", "layer")
    rec = gm.surgeon_record.to_dict()
    assert rec["method"] == "fx" and rec["unreached"] == []
    assert all("." not in s["name"] for s in rec["sites"])


def test_nfnet_blocks_are_traced_through() -> None:
    """timm's NormFreeBlock is a timm leaf; fx-surgeon traces into it (registry.TRACE_THROUGH)."""
    model = surgeon.build_model("timm:test_nfnet").eval()
    gm = surgeon.insert(model, "channel", "channel", input_size="3,32,32")
    rec = gm.surgeon_record.to_dict()
    inside = [s for s in rec["sites"] if s["name"].startswith("stages_")]
    assert rec["method"] == "fx" and len(inside) >= 8
    assert any("act1" in s["name"] for s in inside) and any("act3" in s["name"] for s in inside)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), gm.eval()(x))


def test_mobilevit_blocks_get_module_level_sites() -> None:
    model = surgeon.build_model("timm:mobilevit_xxs").eval()
    gm = surgeon.insert(model, "channel", "channel", input_size="3,64,64")
    rec = gm.surgeon_record.to_dict()
    inside = {s["name"]: s for s in rec["sites"] if s.get("extra", {}).get("method") == "module"}
    assert rec["method"] == "hybrid"
    assert inside["stages.2.1.transformer.0.mlp.act"]["channel_dim"] == 2  # (N, L, C) tokens
    assert inside["stages.2.1.conv_kxk.bn"]["kind"] == "norm_act"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), gm.eval()(x))
