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
import warnings

import pytest
import torch
from torch import fx, nn

import surgeon
from surgeon.layers import MODES
from surgeon.recall import compare, count_activation_calls

pytestmark = pytest.mark.usefixtures("seeded", "one_thread")

SMALL_SWIN = {
    "img_size": 64, "window_size": 4, "embed_dim": 24, "depths": (1, 1, 1, 1),
    "num_heads": (1, 1, 1, 1),
}  # fmt: skip

SMALL_CLIP = {"img_size": 32, "depth": 2, "embed_dim": 64, "num_heads": 2}
SMALL_GEMMA4 = {
    "embed_dim": 64, "depth": 2, "num_heads": 2, "head_dim": 32, "intermediate_size": 128,
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
    ("timm:test_coatnet", {"img_size": 64}, (3, 64, 64), "CoAtNet"),
    ("timm:vit_base_patch32_clip_quickgelu_224", SMALL_CLIP, (3, 32, 32), "CLIP ViT (QuickGELU)"),
    ("timm:tiny_vit_5m_224", {}, (3, 64, 64), "TinyViT (leaf blocks)"),
    ("timm:efficientvit_m0", {}, (3, 64, 64), "EfficientViT-M (softmax in a leaf)"),
    ("timm:gemma4_vit_167m", SMALL_GEMMA4, (3, 96, 96), "Gemma4 ViT (untraceable: eager)"),
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
                   "Swin", "NFNet", "DenseNet", "MobileViT", "EfficientViT", "CoAtNet",
                   "QuickGELU", "untraceable"):  # fmt: skip
        assert family in families
    combos = {c.values[3] for c in CASES}
    assert combos == set(itertools.product(MODES, MODES))


def _expected_shape(mode: str, site: dict) -> tuple[int, ...]:
    shape = site["shape"]
    return {"layer": (), "element": tuple(shape[1:]), "channel": (shape[site["channel_dim"]],)}[
        mode
    ]


@pytest.mark.filterwarnings("ignore:cannot trace")  # the untraceable model's one line
@pytest.mark.parametrize(("spec", "args", "size", "combo"), CASES)
def test_identity_gradients_and_shapes(
    spec, args, size, combo, max_abs_diff, params_without_grad
) -> None:
    shift, scale = combo
    model = zoo_model(spec, args)
    gm = surgeon.insert(model, shift, scale, input_size=list(size))
    if isinstance(gm, fx.GraphModule):
        gm.graph.lint()
    sites = gm.surgeon_record.to_dict()["sites"]
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


# how each model is handled when it is not plain FX, and the activation calls that get no site
METHOD = {
    "timm:efficientvit_b0": "hybrid", "timm:mobilevit_xxs": "hybrid",
    "timm:tiny_vit_5m_224": "hybrid", "timm:efficientvit_m0": "hybrid",
    "timm:gemma4_vit_167m": "eager",
}  # fmt: skip
MISSED = {
    "timm:efficientvit_m0": {
        "Tensor.softmax inside leaf LocalWindowAttention is not an activation module": 24
    },
}


@pytest.mark.parametrize(("spec", "args", "size"), [z[:3] for z in ZOO], ids=[z[0] for z in ZOO])
def test_sites_match_the_activation_calls_the_model_makes(spec, args, size) -> None:
    """Site recall, as benchmarks/zoo.py measures it on the whole zoo: every activation call
    of an eager forward (module, function and method forms) is a site, or is listed with
    its reason; the warning for the untraceable model is one line."""
    model = zoo_model(spec, args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = surgeon.insert(model, "layer", "layer", input_size=list(size))
    record = gm.surgeon_record.to_dict()
    assert record["method"] == METHOD.get(spec, "fx")
    cov = compare(record, count_activation_calls(model, torch.randn(2, *size)))
    assert cov.unexplained == {}
    assert dict(cov.reasons) == MISSED.get(spec, {})
    assert cov.covered == cov.total - sum(MISSED.get(spec, {}).values()) > 0
    fallback = [str(w.message) for w in caught if "cannot trace" in str(w.message)]
    if record["method"] == "eager":
        assert len(fallback) == 1 and "\n" not in fallback[0]
        assert fallback[0].endswith("inserted at module level instead (method: eager)")
    else:
        assert fallback == []


@pytest.mark.filterwarnings("ignore:cannot trace")
@pytest.mark.parametrize(
    "spec",
    ["timm:efficientnet_b0", "timm:mobilevit_xxs", "timm:tiny_vit_5m_224", "timm:gemma4_vit_167m"],
)
def test_save_load_round_trip(spec, tmp_path) -> None:
    """FX, hybrid (sites inside leaves) and eager models save and load with trained-looking
    values: the loaded model computes bit-identical outputs."""
    args, size = next((a, s) for z, a, s, _ in ZOO if z == spec)
    gm = surgeon.insert(zoo_model(spec, args), "channel", "layer", input_size=list(size))
    with torch.no_grad():
        for m in surgeon.inserted_modules(gm).values():
            m.shift.uniform_(-0.5, 0.5)
            m.scale.uniform_(0.5, 1.5)
    gm.eval()
    surgeon.save(gm, tmp_path / "m")
    loaded = surgeon.load(tmp_path / "m")
    assert loaded.surgeon_record.to_dict()["sites"] == gm.surgeon_record.to_dict()["sites"]
    x = torch.randn(2, *size)
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))
