"""Saving and loading surgered models: surgery.json + model.safetensors, no pickle."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import surgeon
from surgeon import ShiftScale, SurgeonError
from surgeon import io as sio

pytestmark = pytest.mark.usefixtures("seeded", "one_thread")


def _perturb(model: torch.nn.Module) -> None:
    """Move every weight away from its init so a round trip cannot pass by accident."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                b.normal_()


@torch.no_grad()
def _outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        return model(x)
    finally:
        model.train(was)


@pytest.fixture
def no_pickle(monkeypatch) -> None:
    """Make any unpickling during the test an error."""

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    class Refusing(pickle.Unpickler):  # a class: libraries imported later subclass it
        def __init__(self, *args, **kwargs) -> None:
            refuse()

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", Refusing)
    monkeypatch.setattr(torch, "load", refuse)


@pytest.mark.parametrize(
    ("spec", "args", "shift", "scale", "size"),
    [
        ("allconv", {"width": 0.25, "dropout": True}, "channel", "element", (3, 32, 32)),
        ("mlp", {"hidden": [16, 8], "input_size": [3, 4, 4]}, "element", "layer", (3, 4, 4)),
        ("timm:test_byobnet", {"num_classes": 5}, "layer", "channel", (3, 32, 32)),
    ],
)
def test_round_trip_is_bit_identical(tmp_path, no_pickle, spec, args, shift, scale, size) -> None:
    model = surgeon.build_model(spec, args)
    gm = surgeon.insert(model, shift, scale, input_size=list(size))
    _perturb(gm)
    folder = surgeon.save(gm, tmp_path / "saved")
    assert sorted(p.name for p in folder.iterdir()) == [
        "model.safetensors", "model_fx.py", "surgery.json",
    ]  # fmt: skip
    loaded = surgeon.load(folder)
    x = torch.randn(3, *size)
    assert torch.equal(_outputs(loaded, x), _outputs(gm, x))
    assert loaded.state_dict().keys() == gm.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in gm.state_dict().items())
    assert list(surgeon.inserted_modules(loaded)) == list(surgeon.inserted_modules(gm))
    assert loaded.training == gm.training


def test_surgery_json_holds_spec_options_sites_and_versions(tmp_path) -> None:
    model = surgeon.build_model("allconv", {"width": 0.25})
    gm = surgeon.insert(model, "channel", "none", exclude=["features_1*"])
    surgeon.save(gm, tmp_path / "m")
    rec = json.loads((tmp_path / "m" / "surgery.json").read_text())
    assert rec["format"] == "fx-surgeon" and rec["format_version"] == sio.FORMAT_VERSION
    assert rec["source"] == {"spec": "allconv", "args": {"width": 0.25}}
    (p,) = rec["passes"]
    assert (p["name"], p["shift"], p["scale"], p["exclude"]) == (
        "shift_scale", "channel", "none", ["features_1*"],
    )  # fmt: skip
    assert [s["name"] for s in rec["sites"]] == ["x", "features_3", "features_5", "features_8"]
    assert rec["sites"][1]["shape"] == [-1, 24, 32, 32] and rec["sites"][1]["channel_dim"] == 1
    assert {"torch", "torchvision", "timm", "fx-surgeon"} <= set(rec["versions"])
    assert "def forward" in (tmp_path / "m" / "model_fx.py").read_text()


def test_weights_file_is_plain_safetensors(tmp_path) -> None:
    gm = surgeon.insert(surgeon.build_model("allconv", {"width": 0.25}), "layer", "layer")
    surgeon.save(gm, tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(gm.state_dict())
    assert {"ss_x.shift", "ss_x.scale", "features.0.weight"} <= keys


def test_load_replays_batchnorm_and_eval_mode_passes(tmp_path, models_dir) -> None:
    spec = f"{models_dir / 'forms.py'}:AuxHead"
    model = surgeon.build_model(spec).eval()  # traced in eval: no auxiliary head in the graph
    gm = surgeon.insert(surgeon.insert_batchnorm(model), "channel", "channel")
    _perturb(gm)
    surgeon.save(gm, tmp_path / "m")
    loaded = surgeon.load(tmp_path / "m", trust_code=True)  # a model file: code
    assert [p["traced_in"] for p in loaded.surgeon_record.to_dict()["passes"]] == ["eval", "eval"]
    assert "aux.weight" not in loaded.state_dict()
    x = torch.randn(4, 6)
    assert torch.equal(_outputs(loaded, x), _outputs(gm, x))


def test_strip_then_save_and_load(tmp_path) -> None:
    model = surgeon.build_model("allconv", {"width": 0.25})
    gm = surgeon.insert(model, "channel", "channel")
    plain = surgeon.strip(gm)
    surgeon.save(plain, tmp_path / "plain")
    loaded = surgeon.load(tmp_path / "plain")
    assert not any(isinstance(m, ShiftScale) for m in loaded.modules())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(_outputs(loaded, x), _outputs(model, x))


def test_overwrites_a_saved_model_but_refuses_other_folders(tmp_path) -> None:
    gm = surgeon.insert(surgeon.build_model("mlp", {"hidden": [4]}), "layer", "layer")
    (tmp_path / "empty").mkdir()
    surgeon.save(gm, tmp_path / "empty")  # an empty folder is fine
    surgeon.save(gm, tmp_path / "empty")  # and so is a saved model
    assert (tmp_path / "empty" / "surgery.json").is_file()

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(SurgeonError, match="refusing to write into") as err:
        surgeon.save(gm, other)
    assert "-o" in err.value.hint
    assert (other / "notes.txt").read_text() == "keep me"

    run = tmp_path / "run"  # a saved model with other files next to it (a run folder)
    surgeon.save(gm, run)
    (run / "log.txt").write_text("epoch 1")
    with pytest.raises(SurgeonError, match="refusing"):
        surgeon.save(gm, run)
    assert (run / "log.txt").exists()

    (tmp_path / "file").write_text("x")
    with pytest.raises(SurgeonError, match="refusing"):
        surgeon.save(gm, tmp_path / "file")


def test_a_failed_save_leaves_nothing_behind(tmp_path, monkeypatch) -> None:
    gm = surgeon.insert(surgeon.build_model("mlp", {"hidden": [4]}), "layer", "layer")
    surgeon.save(gm, tmp_path / "old")
    before = (tmp_path / "old" / "model.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(sio, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        surgeon.save(gm, tmp_path / "new")
    with pytest.raises(OSError, match="disk full"):
        surgeon.save(gm, tmp_path / "old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no temp folders left
    assert (tmp_path / "old" / "model.safetensors").read_bytes() == before


def test_saving_needs_to_know_how_the_model_was_built(tmp_path, forms) -> None:
    gm = surgeon.insert(forms.ModuleActs(), "layer", "layer")
    with pytest.raises(SurgeonError, match="does not say how it was built") as err:
        surgeon.save(gm, tmp_path / "m")
    assert "build_model" in err.value.hint
    assert not (tmp_path / "m").exists()


def test_load_errors_are_one_line_with_a_hint(tmp_path) -> None:
    with pytest.raises(SurgeonError, match="no surgery.json"):
        surgeon.load(tmp_path)
    (tmp_path / "surgery.json").write_text("{not json")
    with pytest.raises(SurgeonError, match="not valid JSON"):
        surgeon.load(tmp_path)
    (tmp_path / "surgery.json").write_text('{"format": "other"}')
    with pytest.raises(SurgeonError, match="not written by fx-surgeon"):
        surgeon.load(tmp_path)

    gm = surgeon.insert(surgeon.build_model("mlp", {"hidden": [4]}), "layer", "layer")
    surgeon.save(gm, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(SurgeonError, match="has no model.safetensors"):
        surgeon.load(tmp_path / "m")


def test_load_is_strict(tmp_path) -> None:
    gm = surgeon.insert(surgeon.build_model("mlp", {"hidden": [4]}), "layer", "layer")
    folder = surgeon.save(gm, tmp_path / "m")
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    save_file({**state, "extra.weight": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(SurgeonError, match="does not fit the rebuilt model") as err:
        surgeon.load(folder)
    assert "extra.weight" in err.value.message and "\n" not in err.value.message
    del state["ss_x.shift"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(SurgeonError, match="ss_x.shift"):
        surgeon.load(folder)


def test_saved_folder_is_self_describing(tmp_path) -> None:
    gm = surgeon.insert(surgeon.build_model("allconv", {"width": 0.25}), "layer", "layer")
    folder = surgeon.save(gm, tmp_path / "a" / "b")  # parents are created
    assert isinstance(folder, Path) and folder == tmp_path / "a" / "b"
    assert sio.read_record(folder).sites[0].module == "ss_x"


class _TiedAndViews(nn.Module):
    """Tied weights, and buffers that are views of one tensor (one non-contiguous), like
    the rotary tables of timm's EVA-02 that safetensors' ``save_model`` cannot write."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        table = torch.arange(32.0).reshape(4, 8)
        self.register_buffer("sin", table[:, :4])  # a view, not contiguous
        self.register_buffer("cos", table[:, 4:])

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) * self.sin.sum() + self.cos.mean()


def test_tied_weights_and_non_contiguous_buffers_round_trip(tmp_path) -> None:
    from surgeon.io import read_weights, write_weights

    torch.manual_seed(0)
    src = _TiedAndViews()
    write_weights(src, tmp_path / "w.safetensors")
    dst = _TiedAndViews()
    with torch.no_grad():
        for p in dst.parameters():
            p.zero_()
        dst.sin.zero_()
    read_weights(dst, tmp_path / "w.safetensors")
    assert dst.b.weight is dst.a.weight  # still tied
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        assert "b.weight" not in set(f.keys())  # the tied tensor is written once
    write_weights(src, tmp_path / "again.safetensors")  # the same weights, the same bytes
    assert (tmp_path / "again.safetensors").read_bytes() == (
        tmp_path / "w.safetensors"
    ).read_bytes()


def test_eva02_saves_and_loads(tmp_path) -> None:
    model = surgeon.build_model("timm:eva02_tiny_patch14_224", {"img_size": 28, "depth": 1})
    gm = surgeon.insert(model.eval(), "channel", "channel", input_size="3,28,28")
    surgeon.save(gm, tmp_path / "m")
    x = torch.randn(1, 3, 28, 28)
    assert torch.equal(surgeon.load(tmp_path / "m").eval()(x), gm.eval()(x))
