"""Activation modules the tool has never seen, recognised by what they do, and models from
other libraries (transformers vision models, when transformers is installed)."""

from __future__ import annotations

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


def _logits(out):
    return out["logits"] if isinstance(out, dict) else out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize(("build", "gelus"), [(_vit, 2), (_convnext, 2)])
def test_transformers_vision_models(build, gelus) -> None:
    torch.manual_seed(0)
    model = build().eval()
    gm = surgeon.insert(model, "layer", "layer", input_size=[3, 32, 32])
    rec = gm.surgeon_record
    acts = [s for s in rec.sites if s.kind == "activation"]
    assert len(acts) == gelus and all(s.target == "transformers.GELUActivation" for s in acts)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(_logits(gm.eval()(x)), _logits(model(x)))


def test_a_trace_failing_inside_a_library_names_it() -> None:
    with pytest.raises(surgeon.SurgeonError) as exc:
        surgeon.insert(_vit().eval(), input_size=[3, 32, 32], fallback="never")
    assert "inside transformers at " in exc.value.message
    assert "code of transformers, not yours" in exc.value.hint


def test_training_a_transformers_model_from_a_file(tmp_path, monkeypatch) -> None:
    """Its output is an ImageClassifierOutput: the engine trains on its logits."""
    from surgeon_cli.app import main

    (tmp_path / "vit.py").write_text(
        "import transformers\n\n\ndef build_model(num_classes=10):\n"
        "    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32,\n"
        "        num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,\n"
        "        num_labels=num_classes)\n"
        "    return transformers.ViTForImageClassification(cfg)\n"
    )
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--model", "vit.py", "--data", "sample", "--limit-train", "100",
            "--limit-test", "50", "--batch-size", "50", "--epochs", "1", "--device", "cpu",
            "--out", "runs", "--name", "v", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "runs" / "v" / "summary.json").is_file()


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
