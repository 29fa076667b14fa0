"""Adapter files: only the trained tensors, rebuilt on the base they were trained on."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import surgeon
from surgeon.adapters import ADAPTER_FILE, save_adapter


@pytest.fixture
def trained(tmp_path):
    """A base MLP saved as plain weights, then shift/scale + head trained (perturbed)."""
    torch.manual_seed(0)
    base = surgeon.build_model("mlp", {"hidden": [64, 32], "input_size": [3, 8, 8]})
    base_file = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, base_file)
    gm = surgeon.insert(base, "channel", "channel")
    for p in gm.parameters():
        p.requires_grad_(False)
    ss = [m for m in surgeon.inserted_modules(gm).values()]
    head = gm.get_submodule("classifier") if hasattr(gm, "classifier") else None
    trainable = [p for m in ss for p in m.parameters()]
    if head is not None:
        trainable += list(head.parameters())
    with torch.no_grad():
        for p in trainable:
            p.requires_grad_(True)
            p.add_(torch.randn_like(p) * 0.1)
    return gm.eval(), base_file


def test_round_trip_on_the_recorded_base(trained, tmp_path) -> None:
    gm, base_file = trained
    folder = save_adapter(gm, tmp_path / "adapter", base_weights=base_file)
    size = (folder / ADAPTER_FILE).stat().st_size
    assert size < 0.1 * base_file.stat().st_size
    loaded = surgeon.load(folder, base=base_file)
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(loaded(x), gm(x))
    folded, report = surgeon.fold(loaded)  # merged for free at inference
    assert report.count("folded") > 0 and torch.allclose(folded.eval()(x), gm(x), atol=1e-5)


def test_another_base_is_refused_unless_forced(trained, tmp_path) -> None:
    gm, base_file = trained
    folder = save_adapter(gm, tmp_path / "adapter", base_weights=base_file)
    other = tmp_path / "other.safetensors"
    from safetensors.torch import load_file

    state = load_file(base_file)
    state[next(iter(state))] += 1
    save_file(state, other)
    with pytest.raises(surgeon.SurgeonError, match="not the base this adapter was trained on"):
        surgeon.load(folder, base=other)
    assert surgeon.load(folder, base=other, force=True) is not None
    with pytest.raises(surgeon.SurgeonError, match="is an adapter"):
        surgeon.load(folder)
