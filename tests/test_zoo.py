"""Identity at init and gradient flow on real architectures from timm and torchvision.

Every model gets ``channel x channel`` (the thesis's main setting) and one more shift x scale
combination, taken in turn from the other 15, so that the zoo as a whole runs all 16
combinations; each combination also runs on allconv, mlp and the hand-written models in
``test_passes.py``. Models are built small (``*_atto``, ``*_002``, ``test_*`` configs,
fewer blocks, 32-64 px inputs) to keep the suite fast on CPU.

For each (model, combination): the surgered model computes exactly the original outputs
(max |Δ| == 0, fp32, eval mode), every inserted parameter gets a non-zero gradient, and each
parameter's shape matches its site's shape and channel dim.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import surgeon
from surgeon.layers import MODES

pytestmark = pytest.mark.usefixtures("seeded", "one_thread")

SMALL_SWIN = {
    "img_size": 64, "window_size": 4, "embed_dim": 24, "depths": (1, 1, 1, 1),
    "num_heads": (1, 1, 1, 1),
}  # fmt: skip

# spec, model args, input size (C, H, W), family
ZOO = [
    ("timm:resnet10t", {}, (3, 32, 32), "ResNet"),
    ("timm:convnext_atto", {"conv_mlp": False}, (3, 32, 32), "ConvNeXt (channels-last MLP)"),
    ("timm:vit_tiny_patch16_224", {"img_size": 32}, (3, 32, 32), "ViT"),
    ("timm:efficientnet_b0", {}, (3, 32, 32), "EfficientNet"),
    ("timm:mobilenetv3_small_050", {}, (3, 32, 32), "MobileNetV3"),
    ("timm:regnety_002", {}, (3, 32, 32), "RegNet (SE gates)"),
    ("timm:swin_tiny_patch4_window7_224", SMALL_SWIN, (3, 64, 64), "Swin"),
    ("timm:test_nfnet", {}, (3, 32, 32), "NFNet"),
    ("timm:densenet121", {"growth_rate": 8, "block_config": (1, 2, 2, 1)}, (3, 32, 32), "DenseNet"),
    ("timm:ghostnet_050", {}, (3, 32, 32), "GhostNet (F.dropout head)"),
    ("timm:lcnet_050", {}, (3, 32, 32), "LCNet"),
    ("timm:mobilenetv4_conv_small", {}, (3, 32, 32), "MobileNetV4"),
    ("timm:edgenext_xx_small", {}, (3, 64, 64), "EdgeNeXt"),
    ("timm:dla46_c", {}, (3, 32, 32), "DLA"),
    ("timm:hgnetv2_b0", {}, (3, 64, 64), "HGNetV2"),
    ("timm:efficientvit_b0", {}, (3, 64, 64), "EfficientViT"),
    ("timm:repvgg_a0", {}, (3, 32, 32), "RepVGG"),
    ("timm:test_mambaout", {}, (3, 32, 32), "MambaOut"),
    ("timm:test_byobnet", {}, (3, 32, 32), "ByobNet"),
    ("timm:mobilevit_xxs", {}, (3, 64, 64), "MobileViT (leaf blocks)"),
    ("timm:resnest14d", {}, (3, 32, 32), "ResNeSt (inner softmax)"),
    ("torchvision:resnet18", {}, (3, 32, 32), "ResNet"),
    ("torchvision:mobilenet_v3_small", {}, (3, 32, 32), "MobileNetV3"),
    ("torchvision:regnet_y_400mf", {}, (3, 32, 32), "RegNet"),
    ("torchvision:efficientnet_b0", {}, (3, 32, 32), "EfficientNet (StochasticDepth)"),
    ("torchvision:shufflenet_v2_x0_5", {}, (3, 32, 32), "ShuffleNetV2"),
    ("torchvision:mnasnet0_5", {}, (3, 32, 32), "MnasNet"),
]

OTHER_COMBOS = [c for c in itertools.product(MODES, MODES) if c != ("channel", "channel")]
CASES = [
    pytest.param(spec, args, size, combo, id=f"{spec}-{combo[0]}-{combo[1]}")
    for i, (spec, args, size, _) in enumerate(ZOO)
    for combo in (("channel", "channel"), OTHER_COMBOS[i % len(OTHER_COMBOS)])
]

_BUILT: dict[str, nn.Module] = {}


def zoo_model(spec: str, args: dict) -> nn.Module:
    """Each zoo model is built once per session (insert never changes it)."""
    key = f"{spec}{sorted(args.items())}"
    if key not in _BUILT:
        torch.manual_seed(0)
        _BUILT[key] = surgeon.build_model(spec, dict(args))
    return _BUILT[key]


def test_the_zoo_is_big_and_varied() -> None:
    timm_models = [z for z in ZOO if z[0].startswith("timm:")]
    tv_models = [z for z in ZOO if z[0].startswith("torchvision:")]
    assert len(timm_models) >= 20 and len(tv_models) >= 5
    families = " ".join(z[3] for z in ZOO)
    for family in ("ResNet", "ViT", "ConvNeXt", "EfficientNet", "MobileNetV3", "RegNet",
                   "Swin", "NFNet", "DenseNet"):  # fmt: skip
        assert family in families
    combos = {c.values[3] for c in CASES}
    assert combos == set(itertools.product(MODES, MODES))


def _expected_shape(mode: str, site: dict) -> tuple[int, ...]:
    shape = site["shape"]
    return {"layer": (), "element": tuple(shape[1:]), "channel": (shape[site["channel_dim"]],)}[
        mode
    ]


@pytest.mark.parametrize(("spec", "args", "size", "combo"), CASES)
def test_identity_gradients_and_shapes(
    spec, args, size, combo, max_abs_diff, params_without_grad
) -> None:
    shift, scale = combo
    model = zoo_model(spec, args)
    gm = surgeon.insert(model, shift, scale, input_size=list(size))
    gm.graph.lint()
    sites = gm.surgeon_record["sites"]
    mods = surgeon.inserted_modules(gm)
    if shift == scale == "none":
        assert mods == {}
    else:
        assert len(mods) == len(sites) > 1
        assert sites[0]["kind"] == "input"
        for site in sites:
            m = mods[site["module"]]
            if shift != "none":
                assert tuple(m.shift.shape) == _expected_shape(shift, site), site["name"]
            if scale != "none":
                assert tuple(m.scale.shape) == _expected_shape(scale, site), site["name"]
    x = torch.randn(2, *size)
    assert max_abs_diff(model, gm, x) == 0.0
    assert params_without_grad(gm, x) == []
