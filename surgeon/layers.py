"""The shift and scale layers of the thesis: ``y = (x + shift) * scale``.

Each parameter is per ``element`` (one value per element of a sample), per ``channel``
or per ``layer`` (one scalar); ``none`` leaves it out. At init shift is 0 and scale is 1,
so the layer is an exact identity. Parameters stay fp32 and are cast to the input's
dtype in forward, so a bf16 activation stays bf16.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import SurgeryError
from .modes import MODES, check_mode
from .ops import shift_scale

__all__ = [
    "MODES", "ChannelBatchNorm", "ReLUShiftScale", "Scale", "Shift", "ShiftScale", "check_mode",
    "make_shift_scale", "param_shape",
]  # fmt: skip


def param_shape(mode: str, feature_shape: Sequence[int], channel_dim: int) -> tuple[int, ...]:
    """Shape of a shift/scale parameter.

    ``feature_shape`` is the shape of one sample (the tensor shape without the batch dim);
    ``channel_dim`` indexes the full tensor (batch dim included), so dim 1 is NCHW's C.
    """
    if check_mode(mode) in ("none", "layer"):
        return ()
    if mode == "element":
        return tuple(int(s) for s in feature_shape)
    if not 1 <= channel_dim <= len(feature_shape):
        raise SurgeryError(
            f"channel dim {channel_dim} is out of range for a sample of shape {tuple(feature_shape)}",
            hint="the channel mode needs a tensor with a batch dim and at least one feature dim",
        )
    return (int(feature_shape[channel_dim - 1]),)


class ShiftScale(nn.Module):
    """``y = (x + shift) * scale`` with independent modes for shift and scale.

    Args:
        shift: mode of the additive parameter (``none``/``element``/``channel``/``layer``).
        scale: mode of the multiplicative parameter.
        feature_shape: shape of one sample, e.g. ``(C, H, W)``; needed by ``element`` and
            ``channel`` modes.
        channel_dim: dim of the full tensor (batch included) that holds the channels:
            1 for NCHW, ``ndim - 1`` for (N, C), (N, L, C) and channels-last (N, H, W, C).
        fused: compute with the one-pass op of :mod:`surgeon.ops` (same result within
            rounding; a Triton kernel on CUDA). Off by default.
    """

    def __init__(
        self,
        shift: str = "layer",
        scale: str = "layer",
        feature_shape: Sequence[int] = (),
        channel_dim: int = 1,
        fused: bool = False,
    ) -> None:
        super().__init__()
        self.fused = bool(fused)
        self.shift_mode = check_mode(shift, "shift mode")
        self.scale_mode = check_mode(scale, "scale mode")
        self.feature_shape = tuple(int(s) for s in feature_shape)
        self.channel_dim = int(channel_dim)
        ndim = len(self.feature_shape) + 1
        self._view = [1] * ndim
        if "channel" in (shift, scale):
            self._view[self.channel_dim] = -1
        if shift != "none":
            self.shift = nn.Parameter(
                torch.zeros(param_shape(shift, self.feature_shape, channel_dim))
            )
        else:
            self.register_parameter("shift", None)
        if scale != "none":
            self.scale = nn.Parameter(
                torch.ones(param_shape(scale, self.feature_shape, channel_dim))
            )
        else:
            self.register_parameter("scale", None)

    def _broadcast(self, p: torch.Tensor, mode: str, x: torch.Tensor) -> torch.Tensor:
        p = p.to(x.dtype)
        return p.view(self._view) if mode == "channel" else p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return shift_scale(
                x, self.shift, self.scale, self.shift_mode, self.scale_mode, self.channel_dim
            )
        if self.shift is not None:
            x = x + self._broadcast(self.shift, self.shift_mode, x)
        if self.scale is not None:
            x = x * self._broadcast(self.scale, self.scale_mode, x)
        return x

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Back to the identity: shift 0, scale 1."""
        if self.shift is not None:
            self.shift.zero_()
        if self.scale is not None:
            self.scale.fill_(1.0)

    def effective_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)`` with ``y = a * x + b``, each shaped to broadcast against a sample.

        Shapes are those of the parameters (``()`` for layer mode, ``(C,)`` for channel
        mode, the sample shape for element mode); missing parts are 1 and 0.
        """
        with torch.no_grad():
            one = torch.ones(())
            shift = self.shift.detach().float() if self.shift is not None else one * 0
            scale = self.scale.detach().float() if self.scale is not None else one
            if self.shift_mode == "element" or self.scale_mode == "element":
                shift = self._to_sample(shift, self.shift_mode)
                scale = self._to_sample(scale, self.scale_mode)
            return scale.clone(), (shift * scale).clone()

    def _to_sample(self, p: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "channel":
            view = [1] * len(self.feature_shape)
            view[self.channel_dim - 1] = -1
            return p.view(view).expand(self.feature_shape)
        return p.expand(self.feature_shape)

    def rebuilt_as(self, cls: type[ShiftScale], fused: bool) -> ShiftScale:
        """A ``cls`` module with this module's modes and the very same parameters."""
        new = cls(
            self.shift_mode, self.scale_mode, self.feature_shape, self.channel_dim, fused=fused
        )
        new.register_parameter("shift", self.shift)
        new.register_parameter("scale", self.scale)
        return new.train(self.training)

    def extra_repr(self) -> str:
        parts = []
        for name, mode in (("shift", self.shift_mode), ("scale", self.scale_mode)):
            p = getattr(self, name)
            shape = "" if p is None else f"{tuple(p.shape)}"
            parts.append(f"{name}={mode}{shape}")
        return ", ".join(parts) + f", channel_dim={self.channel_dim}"


class Shift(ShiftScale):
    """``y = x + shift``, per element, channel or layer."""

    def __init__(
        self, mode: str = "layer", feature_shape: Sequence[int] = (), channel_dim: int = 1
    ) -> None:
        super().__init__(
            shift=mode, scale="none", feature_shape=feature_shape, channel_dim=channel_dim
        )


class Scale(ShiftScale):
    """``y = x * scale``, per element, channel or layer."""

    def __init__(
        self, mode: str = "layer", feature_shape: Sequence[int] = (), channel_dim: int = 1
    ) -> None:
        super().__init__(
            shift="none", scale=mode, feature_shape=feature_shape, channel_dim=channel_dim
        )


class ReLUShiftScale(ShiftScale):
    """``y = (relu(x) + shift) * scale``: a ReLU merged into the shift-scale after it.

    Same parameters (and state-dict keys) as the :class:`ShiftScale` it replaces; made by
    :func:`surgeon.passes.fuse_relu`, undone by :func:`surgeon.passes.unfuse_relu`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return super().forward(torch.relu(x))
        return shift_scale(
            x, self.shift, self.scale, self.shift_mode, self.scale_mode, self.channel_dim, True
        )

    @classmethod
    def from_module(cls, m: ShiftScale) -> ReLUShiftScale:
        """A ReLU + ``m`` module sharing ``m``'s parameters; fused."""
        return m.rebuilt_as(cls, fused=True)

    def extra_repr(self) -> str:
        return "relu, " + super().extra_repr()


def make_shift_scale(
    shift: str,
    scale: str,
    feature_shape: Sequence[int] = (),
    channel_dim: int = 1,
    *,
    fused: bool = False,
    device: torch.device | str | None = None,
    values: dict[str, torch.Tensor] | None = None,
) -> ShiftScale:
    """The one way the passes make a shift/scale module: modes, the sample shape, the
    channel dim, on ``device``; identity unless ``values`` (``{"shift": t, "scale": t}``)
    gives starting values."""
    m = ShiftScale(shift, scale, feature_shape, channel_dim, fused=fused)
    if device is not None:
        m = m.to(device)
    with torch.no_grad():
        for name, value in (values or {}).items():
            getattr(m, name).copy_(value)
    return m


class ChannelBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the channel dim ``channel_dim`` of an ``ndim``-D tensor.

    Channel dim 1 of a 2-D..5-D tensor is plain BatchNorm; any other channel dim (tokens
    (N, L, C), channels-last (N, H, W, C)) is moved to dim 1 and back.
    """

    def __init__(self, num_features: int, ndim: int, channel_dim: int = 1, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.ndim, self.channel_dim = int(ndim), int(channel_dim)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != self.ndim:
            raise ValueError(f"expected {self.ndim}D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_dim == 1:
            return super().forward(x)
        return super().forward(x.movedim(self.channel_dim, 1)).movedim(1, self.channel_dim)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ndim={self.ndim}, channel_dim={self.channel_dim}"
