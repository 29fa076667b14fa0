"""SSF placement (Lian et al. 2022): shift/scale after every linear, conv and norm layer but
the classifier, identity at init unless SSF's random init is asked for."""

from __future__ import annotations

import pytest
import torch

import surgeon


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    return surgeon.build_model("timm:vit_tiny_patch16_224", {"num_classes": 5, **kw}).eval()


def test_ssf_sites_of_a_vit(vit, tmp_path) -> None:
    gm = surgeon.insert(vit, "channel", "channel", placement="ssf", input_size=[3, 32, 32])
    sites = gm.surgeon_record.sites
    # patch embedding, per block 2 norms + qkv, proj, fc1, fc2, the final norm; no head
    assert len(sites) == 1 + 2 * 6 + 1
    assert [s.kind for s in sites[:3]] == ["linear", "norm", "linear"]
    assert all(s.channel_dim == (1 if s.name == "patch_embed_proj" else 2) for s in sites)
    assert "head" not in {s.name for s in sites}
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(gm(x), vit(x))
    added = sum(m.shift.numel() + m.scale.numel() for m in surgeon.inserted_modules(gm).values())
    assert added == 2 * sum(s.shape[s.channel_dim] for s in sites)
    loaded = surgeon.load(surgeon.save(gm, tmp_path / "ssf"))
    assert [s.name for s in loaded.surgeon_record.sites] == [s.name for s in sites]


def test_ssf_random_init(vit) -> None:
    torch.manual_seed(1)
    gm = surgeon.insert(vit, "channel", "channel", placement="ssf", input_size=[3, 32, 32],
                        init_std=0.02)  # fmt: skip
    scales = torch.cat([m.scale for m in surgeon.inserted_modules(gm).values()])
    assert 0.005 < scales.std().item() < 0.05 and abs(scales.mean().item() - 1) < 0.01
    x = torch.randn(2, 3, 32, 32)
    assert not torch.equal(gm(x), vit(x))


def test_bad_placement_is_one_error() -> None:
    with pytest.raises(surgeon.SurgeonError, match="invalid placement"):
        surgeon.insert(surgeon.build_model("mlp"), placement="everywhere")
