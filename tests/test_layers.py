"""The shift/scale layers: modes, identity at init, dtype, channel axis, repr, gradients."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from surgeon import Scale, Shift, ShiftScale, SurgeonError
from surgeon.layers import MODES, ChannelBatchNorm, check_mode, param_shape

COMBOS = list(itertools.product(MODES, MODES))

# (sample shape, channel dim of the full tensor, channels)
LAYOUTS = {
    "NCHW": ((4, 5, 6), 1, 4),
    "NC": ((7,), 1, 7),
    "NLC": ((5, 6), 2, 6),
    "NHWC": ((5, 6, 4), 3, 4),
}

pytestmark = pytest.mark.usefixtures("seeded", "one_thread")


def expected_param_shape(mode: str, sample: tuple[int, ...], cdim: int) -> tuple[int, ...]:
    return {"none": (), "layer": (), "element": sample, "channel": (sample[cdim - 1],)}[mode]


@pytest.mark.parametrize(("shift", "scale"), COMBOS)
def test_all_16_combinations_are_identity_at_init(shift: str, scale: str) -> None:
    layer = ShiftScale(shift, scale, (4, 5, 6), channel_dim=1)
    x = torch.randn(3, 4, 5, 6)
    assert torch.equal(layer(x), x)
    assert (layer.shift is None) == (shift == "none")
    assert (layer.scale is None) == (scale == "none")
    if layer.shift is not None:
        assert layer.shift.shape == expected_param_shape(shift, (4, 5, 6), 1)
        assert not layer.shift.any()
    if layer.scale is not None:
        assert layer.scale.shape == expected_param_shape(scale, (4, 5, 6), 1)
        assert (layer.scale == 1).all()


@pytest.mark.parametrize(("shift", "scale"), COMBOS)
def test_forward_is_shift_then_scale(shift: str, scale: str) -> None:
    layer = ShiftScale(shift, scale, (4, 5, 6), channel_dim=1)
    with torch.no_grad():
        if layer.shift is not None:
            layer.shift.normal_()
        if layer.scale is not None:
            layer.scale.normal_()
    x = torch.randn(2, 4, 5, 6)
    b = torch.zeros(()) if layer.shift is None else layer.shift
    a = torch.ones(()) if layer.scale is None else layer.scale
    if shift == "channel":
        b = b.view(1, -1, 1, 1)
    if scale == "channel":
        a = a.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), (x + b) * a, rtol=0, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_channel_mode_follows_the_channel_axis(layout: str) -> None:
    sample, cdim, channels = LAYOUTS[layout]
    layer = ShiftScale("channel", "channel", sample, channel_dim=cdim)
    assert layer.shift.shape == layer.scale.shape == (channels,)
    with torch.no_grad():
        layer.shift.copy_(torch.arange(channels, dtype=torch.float32))
        layer.scale.fill_(2.0)
    x = torch.zeros(2, *sample)
    y = layer(x)
    # every element of channel c becomes 2 * c, whatever its position along the other axes
    expected_shape = [1] * (len(sample) + 1)
    expected_shape[cdim] = channels
    expected = (2 * torch.arange(channels, dtype=torch.float32)).view(expected_shape)
    assert torch.equal(y, expected.expand_as(y))


def test_channels_last_differs_from_channels_first() -> None:
    """Same shape, two layouts: (N, 4, 5, 4) read as NCHW or NHWC gives different outputs."""
    x = torch.randn(2, 4, 5, 4)
    first, last = (
        ShiftScale("channel", "none", (4, 5, 4), 1),
        ShiftScale("channel", "none", (4, 5, 4), 3),
    )
    with torch.no_grad():
        first.shift.copy_(torch.arange(4.0))
        last.shift.copy_(torch.arange(4.0))
    assert first(x)[0, 1, 0, 0] - x[0, 1, 0, 0] == 1
    assert last(x)[0, 1, 0, 0] - x[0, 1, 0, 0] == 0
    assert last(x)[0, 0, 0, 3] - x[0, 0, 0, 3] == 3


@pytest.mark.parametrize(("shift", "scale"), COMBOS)
def test_dtype_is_kept_and_params_stay_fp32(shift: str, scale: str) -> None:
    layer = ShiftScale(shift, scale, (4, 3), channel_dim=2)
    x = torch.randn(2, 4, 3).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, x)
    assert all(p.dtype == torch.float32 for p in layer.parameters())


def test_bf16_gradients_reach_fp32_params() -> None:
    layer = ShiftScale("channel", "element", (4, 3), channel_dim=2)
    x = torch.randn(2, 4, 3, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()
    assert layer.shift.grad.dtype == layer.scale.grad.dtype == torch.float32
    assert x.grad is not None and x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize(("shift", "scale"), [c for c in COMBOS if c != ("none", "none")])
def test_gradients_match_the_formula(shift: str, scale: str) -> None:
    layer = ShiftScale(shift, scale, (4, 5, 6), channel_dim=1)
    x = torch.randn(2, 4, 5, 6)
    w = torch.randn(2, 4, 5, 6)
    (layer(x) * w).sum().backward()
    # at identity: d/dshift = sum(w), d/dscale = sum(w * x), reduced to the parameter's shape
    reduce = {"layer": lambda t: t.sum(), "element": lambda t: t.sum(0),
              "channel": lambda t: t.sum((0, 2, 3))}  # fmt: skip
    if layer.shift is not None:
        torch.testing.assert_close(layer.shift.grad, reduce[shift](w))
    if layer.scale is not None:
        torch.testing.assert_close(layer.scale.grad, reduce[scale](w * x))


def test_repr_shows_modes_shapes_and_channel_dim() -> None:
    r = repr(ShiftScale("channel", "element", (4, 5, 6), channel_dim=1))
    assert "shift=channel(4,)" in r
    assert "scale=element(4, 5, 6)" in r
    assert "channel_dim=1" in r
    assert "shift=none" in repr(ShiftScale("none", "layer"))
    assert "scale=layer()" in repr(ShiftScale("none", "layer"))


def test_shift_and_scale_classes() -> None:
    s, k = Shift("channel", (3, 2), channel_dim=1), Scale("element", (3, 2))
    assert isinstance(s, ShiftScale) and s.scale is None and s.shift.shape == (3,)
    assert isinstance(k, ShiftScale) and k.shift is None and k.scale.shape == (3, 2)
    x = torch.randn(2, 3, 2)
    assert torch.equal(s(x), x) and torch.equal(k(x), x)


@pytest.mark.parametrize("bad", ["", "Layer", "channels", "per-channel", "elementwise"])
def test_invalid_mode_is_a_one_line_error_with_hint(bad: str) -> None:
    with pytest.raises(SurgeonError) as err:
        ShiftScale(bad, "layer")
    assert "invalid shift mode" in err.value.message
    assert "element" in err.value.hint
    with pytest.raises(SurgeonError, match="invalid scale mode"):
        ShiftScale("layer", bad)
    with pytest.raises(SurgeonError):
        check_mode(bad)


def test_channel_dim_out_of_range_is_an_error() -> None:
    with pytest.raises(SurgeonError, match="channel dim"):
        param_shape("channel", (4, 5), channel_dim=3)
    with pytest.raises(SurgeonError, match="channel dim"):
        param_shape("channel", (4, 5), channel_dim=0)


def test_effective_affine_numbers() -> None:
    layer = ShiftScale("channel", "layer", (3, 2, 2), channel_dim=1)
    with torch.no_grad():
        layer.shift.copy_(torch.tensor([1.0, -2.0, 0.5]))
        layer.scale.fill_(3.0)
    a, b = layer.effective_affine()
    assert a.shape == () and a.item() == 3.0
    assert torch.equal(b, torch.tensor([3.0, -6.0, 1.5]))  # b = shift * scale
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(layer(x), a * x + b.view(1, 3, 1, 1))


def test_effective_affine_element_mode_expands_channel_params() -> None:
    layer = ShiftScale("channel", "element", (3, 2), channel_dim=1)
    with torch.no_grad():
        layer.shift.copy_(torch.tensor([1.0, 2.0, 3.0]))
        layer.scale.copy_(torch.arange(6.0).view(3, 2))
    a, b = layer.effective_affine()
    assert a.shape == b.shape == (3, 2)
    # shift per channel (row), scale per element: b = shift[c] * scale[c, j]
    assert torch.equal(b, torch.tensor([[0.0, 1.0], [4.0, 6.0], [12.0, 15.0]]))
    x = torch.randn(5, 3, 2)
    torch.testing.assert_close(layer(x), a * x + b)


def test_effective_affine_defaults_and_reset() -> None:
    a, b = ShiftScale("none", "none").effective_affine()
    assert a.item() == 1.0 and b.item() == 0.0
    layer = ShiftScale("layer", "layer")
    with torch.no_grad():
        layer.shift.fill_(2.0)
        layer.scale.fill_(-1.0)
    a, b = layer.effective_affine()
    assert (a.item(), b.item()) == (-1.0, -2.0)
    layer.reset_parameters()
    x = torch.randn(3, 4)
    assert torch.equal(layer(x), x)


def test_state_dict_holds_only_the_used_parameters() -> None:
    assert set(ShiftScale("channel", "none", (3,), 1).state_dict()) == {"shift"}
    assert set(ShiftScale("none", "layer").state_dict()) == {"scale"}
    assert set(ShiftScale("element", "layer", (3,)).state_dict()) == {"shift", "scale"}
    assert ShiftScale("none", "none").state_dict() == {}


@pytest.mark.parametrize("cdim", [1, 2, 3])
def test_channel_batchnorm_normalises_the_channel_axis(cdim: int) -> None:
    shape = [2, 3, 4, 5]
    bn = ChannelBatchNorm(shape[cdim], ndim=4, channel_dim=cdim)
    y = bn(torch.randn(*shape) * 3 + 1)
    dims = [d for d in range(4) if d != cdim]
    torch.testing.assert_close(y.mean(dims), torch.zeros(shape[cdim]), atol=1e-5, rtol=0)
    assert "channel_dim" in repr(bn)


@settings(max_examples=60, deadline=None)
@given(
    shift=st.sampled_from(MODES),
    scale=st.sampled_from(MODES),
    sample=st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple),
    data=st.data(),
)
def test_property_identity_shapes_and_affine(shift, scale, sample, data) -> None:
    cdim = data.draw(st.integers(1, len(sample)), label="channel_dim")
    batch = data.draw(st.integers(1, 3), label="batch")
    layer = ShiftScale(shift, scale, sample, channel_dim=cdim)
    x = torch.randn(batch, *sample)
    assert torch.equal(layer(x), x)  # identity at init, exactly
    for name, mode in (("shift", shift), ("scale", scale)):
        p = getattr(layer, name)
        if mode == "none":
            assert p is None
        else:
            assert tuple(p.shape) == expected_param_shape(mode, sample, cdim)
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(-2, 2)
    a, b = layer.effective_affine()
    if "channel" in (shift, scale) and "element" not in (shift, scale):
        view = [1] * (len(sample) + 1)
        view[cdim] = -1  # (C,) parameters broadcast along the channel axis
        a = a.view(view) if a.dim() else a
        b = b.view(view) if b.dim() else b
    torch.testing.assert_close(layer(x), a * x + b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("shift", "scale"), [("channel", "element"), ("layer", "layer")])
def test_cuda_bf16_identity_and_grads(shift: str, scale: str) -> None:
    layer = ShiftScale(shift, scale, (4, 5, 6), channel_dim=1).cuda()
    x = torch.randn(2, 4, 5, 6, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.device.type == "cuda" and torch.equal(y, x)
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())
