"""Activation modules the tool has never seen, recognised by what they do, and models from
other libraries (transformers vision models, when transformers is installed)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgeon
from surgeon import registry


class MyGELU(nn.Module):
    """transformers' GELUActivation: the function is an attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.fn = F.gelu

    def forward(self, x):
        return self.fn(x)


class MySwish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Scaled(nn.Module):
    """Not an activation: two of them."""

    def forward(self, x):
        return torch.relu(x) + torch.tanh(x)


class Net(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 5), act, nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize(
    ("act", "expected"),
    [(MyGELU(), ("activation", False)), (MySwish(), ("activation", False)), (Scaled(), None),
     (nn.Linear(2, 2), None)],
)  # fmt: skip
def test_activation_modules_are_found_by_behaviour(act, expected) -> None:
    assert registry.lookup_module(act) == expected


@pytest.mark.parametrize("fallback", ["never", "eager"])
@pytest.mark.parametrize("act", [MyGELU, MySwish])
def test_unregistered_activation_modules_get_sites(act, fallback) -> None:
    model = Net(act())
    gm = surgeon.insert(model, "channel", "layer", input_size=[6], fallback=fallback)
    sites = gm.surgeon_record.sites
    assert len(sites) == 2 and sites[0].kind == "input" and sites[1].kind == "activation"
    x = torch.randn(4, 6)
    assert torch.equal(gm.eval()(x), model.eval()(x))


transformers = pytest.importorskip("transformers")


def _vit():
    cfg = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=5,
    )  # fmt: skip
    return transformers.ViTForImageClassification(cfg)


def _convnext():
    cfg = transformers.ConvNextConfig(
        num_channels=3,
        num_stages=2,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        num_labels=5,
        image_size=32,
    )
    return transformers.ConvNextForImageClassification(cfg)


def _swin():
    cfg = transformers.SwinConfig(
        image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
        window_size=2, num_labels=5,
    )  # fmt: skip
    return transformers.SwinForImageClassification(cfg)


def _logits(out):
    return out["logits"] if isinstance(out, dict) else out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize(("build", "gelus"), [(_vit, 2), (_convnext, 2), (_swin, 2)])
def test_transformers_vision_models(build, gelus) -> None:
    """Traced with an example call (their shape/dtype checks and decorated forwards stop the
    plain tracer): an FX graph whose sites are the GELUs that run, exact at init, returning
    the model's own output type, for any batch size."""
    torch.manual_seed(0)
    model = build().eval()
    gm = surgeon.insert(model, "layer", "layer", input_size=[3, 32, 32], fallback="never")
    rec = gm.surgeon_record
    assert isinstance(gm, torch.fx.GraphModule) and rec.method == "fx"
    assert (
        rec.traced_with["example_inputs"] == [[2, 3, 32, 32]] and rec.traced_with["decisions"] > 0
    )
    acts = [s for s in rec.sites if s.kind == "activation"]
    assert len(acts) == gelus and all(s.target == "transformers.GELUActivation" for s in acts)
    assert [s.kind for s in rec.sites].count("input") == 1
    for batch in (2, 5):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            out, ref = gm.eval()(x), model(x)
        assert type(out) is type(ref)
        assert torch.equal(out.logits, ref.logits)


def test_a_trace_failing_inside_a_library_names_it(tmp_path, monkeypatch) -> None:
    """Data-dependent control flow in an installed package: the error names the package's
    frame and the user's nearest one, and the hint says the code is not theirs."""
    lib = tmp_path / "site-packages" / "gatelib"
    lib.mkdir(parents=True)
    (lib / "__init__.py").write_text(
        "import torch\nfrom torch import nn\n\n\nclass Gate(nn.Module):\n"
        "    def forward(self, x):\n"
        "        if x.sum() > 0:\n"
        "            return torch.relu(x)\n"
        "        return x\n"
    )
    monkeypatch.syspath_prepend(str(lib.parent))
    import gatelib

    model = nn.Sequential(nn.Linear(4, 4), gatelib.Gate(), nn.Linear(4, 2))
    with pytest.raises(surgeon.SurgeonError) as exc:
        surgeon.insert(model, input_size=[4], fallback="never")
    assert "inside gatelib at " in exc.value.message
    assert "__init__.py:7" in exc.value.message
    assert "code of gatelib, not yours" in exc.value.hint


def test_a_transformers_model_from_a_file_inserts_trains_and_folds(tmp_path, monkeypatch) -> None:
    """The whole path from a model file: surgeon insert, surgeon train (its output is an
    ImageClassifierOutput: the engine trains on its logits), surgeon fold of the trained run
    (every shift/scale folded, the input's too: x.shape reads no values)."""
    from surgeon_cli.app import main

    (tmp_path / "vit.py").write_text(
        "import transformers\n\n\ndef build_model(num_classes=10):\n"
        "    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32,\n"
        "        num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,\n"
        "        num_labels=num_classes)\n"
        "    return transformers.ViTForImageClassification(cfg)\n"
    )
    monkeypatch.chdir(tmp_path)
    assert main(["insert", "vit.py", "--input-size", "3,32,32", "-o", "ins", "--json"]) == 0
    record = json.loads((tmp_path / "ins" / "surgery.json").read_text())
    assert record["method"] == "fx" and record["traced_with"]["example_inputs"] == [[2, 3, 32, 32]]
    argv = ["train", "--model", "vit.py", "--trust-code", "--data", "sample", "--limit-train",
            "100", "--limit-test", "50", "--batch-size", "50", "--epochs", "1", "--device",
            "cpu", "--out", "runs", "--name", "v", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "runs" / "v" / "summary.json").is_file()
    assert main(["fold", "runs/v", "-o", "folded", "--trust-code", "--json"]) == 0
    folded = json.loads((tmp_path / "folded" / "surgery.json").read_text())["fold"]
    assert folded["folded"] == ["ss_pixel_values", "ss_vit_layers_0_mlp_activation_fn"]
    assert folded["kept"] == [] and folded["scale_folded"] == []
    trained = surgeon.load(tmp_path / "runs" / "v", trust_code=True).eval()
    small = surgeon.load(tmp_path / "folded", trust_code=True).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(small(x).logits, trained(x).logits, atol=1e-5)
    assert not any(type(m).__name__ == "ShiftScale" for m in small.modules())


def test_a_library_in_a_site_packages_inside_the_standard_library_is_still_named() -> None:
    """pyenv and system Pythons keep site-packages inside the standard library's folder
    (``.../lib/python3.11/site-packages``): a frame there is a library's, not the stdlib's."""
    from surgeon.tracing import _not_users

    stdlib = os.path.join(os.sep, "root", ".pyenv", "lib", "python3.11", "")
    lib = os.path.join(stdlib, "site-packages", "transformers", "utils", "generic.py")
    assert not _not_users(lib, skip=(), stdlib=stdlib)
    assert _not_users(os.path.join(stdlib, "contextlib.py"), skip=(), stdlib=stdlib)
    assert _not_users("<string>", skip=(), stdlib=stdlib)
    assert not _not_users(os.path.join(os.sep, "home", "me", "model.py"), skip=(), stdlib=stdlib)


def test_ssf_placement_on_a_transformers_vit() -> None:
    """After every Linear, conv and LayerNorm but the classifier: per block q, k, v, the
    output projection, two LayerNorms, fc1, fc2; plus the patch conv and the final norm."""
    model = _vit().eval()
    gm = surgeon.insert(model, "channel", "channel", input_size=[3, 32, 32], placement="ssf")
    assert len(gm.surgeon_record.sites) == 2 * 8 + 2 and gm.surgeon_record.method == "fx"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(gm(x).logits, model(x).logits)
