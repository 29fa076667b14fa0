"""The shift-scale op: ``y = (x + shift) * scale`` (optionally ``(relu(x) + shift) * scale``)
as one autograd op. Imports nothing from :mod:`surgeon`; the module layer
:class:`surgeon.layers.ShiftScale` calls it when ``fused=True``.

- Forward is one pass: a Triton kernel on CUDA, ``addcmul(shift * scale, x, scale)`` (one
  elementwise kernel) elsewhere. Parameters stay fp32 and are cast to ``x``'s dtype.
- Backward: ``grad_x = grad * scale`` (masked by ``x > 0`` with ReLU);
  ``grad_shift = sum(grad * scale)``, ``grad_scale = sum(grad * (x + shift))``, summed to the
  parameter's shape in fp32. On CUDA that is one pass over ``grad`` and ``x``.
- Under ``torch.compile`` and FX tracing the plain ops run instead, so Inductor fuses them
  with their neighbours itself. Memory and design notes: docs/performance.md.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import fx

BACKEND = os.environ.get("SURGEON_FUSED_BACKEND", "auto")
"""``auto`` (Triton on CUDA when importable, PyTorch elsewhere), ``torch`` or ``triton``
(``triton`` on CPU needs ``TRITON_INTERPRET=1``; the check script uses it)."""

_triton_mod = None
_triton_failed = False


def _triton():
    """The kernels module, or ``None`` where Triton cannot be imported."""
    global _triton_mod, _triton_failed
    if _triton_mod is None and not _triton_failed:
        try:
            from . import _triton as kernels
        except Exception:  # no triton, or a broken install: the PyTorch path
            _triton_failed = True
        else:
            _triton_mod = kernels
    return _triton_mod


class _Spec(NamedTuple):
    shift: str
    scale: str
    channel_dim: int
    relu: bool


def _use_triton(x: torch.Tensor) -> bool:
    if BACKEND == "torch" or (BACKEND == "auto" and not x.is_cuda):
        return False
    tri = _triton()
    return tri is not None and tri.supports(x)


def _view(p: torch.Tensor | None, mode: str, x: torch.Tensor, cd: int) -> torch.Tensor | None:
    """``p`` cast to ``x.dtype`` and shaped to broadcast against ``x``."""
    if p is None:
        return None
    if p.dtype != x.dtype:
        p = p.to(x.dtype)
    if mode == "channel":
        shape = [1] * x.dim()
        shape[cd] = -1
        return p.view(shape)
    return p


def _reduce(t: torch.Tensor, mode: str, cd: int, like: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` to a parameter of ``mode``, accumulating in at least fp32."""
    acc = t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32
    if mode == "layer":
        out = t.sum(dtype=acc)
    elif mode == "element":
        out = t.sum(0, dtype=acc)
    else:
        out = t.sum([d for d in range(t.dim()) if d != cd], dtype=acc)
    return out if out.dtype == like.dtype else out.to(like.dtype)


def _torch_forward(x, shift, scale, spec: _Spec) -> torch.Tensor:
    b = _view(shift, spec.shift, x, spec.channel_dim)
    a = _view(scale, spec.scale, x, spec.channel_dim)
    xs = torch.relu(x) if spec.relu else x
    if a is not None and b is not None:  # (x + b) * a = x * a + b * a: one pass over x
        return torch.addcmul(b * a, xs, a, out=torch.empty_like(x))
    if b is not None:
        return xs + b
    return xs * a


def _torch_backward(g, x, shift, scale, spec: _Spec, need_gx, need_gb, need_ga):
    cd = spec.channel_dim
    b = _view(shift, spec.shift, g, cd)  # x is None when no scale grad and no ReLU
    a = _view(scale, spec.scale, g, cd)
    ga = g * a if a is not None else g  # d/dx before the ReLU mask, and d/d(shift)
    grad_b = _reduce(ga, spec.shift, cd, shift) if need_gb else None
    grad_a = None
    if need_ga:
        if spec.relu:
            t = torch.clamp_min(x, 0)
            if b is not None:
                t.add_(b)
            t.mul_(g)
        else:
            t = (x + b).mul_(g) if b is not None else x * g
        grad_a = _reduce(t, spec.scale, cd, scale)
        del t
    gx = None
    if need_gx:
        gx = ga
        if spec.relu:
            gx = ga.masked_fill_(x <= 0, 0) if a is not None else ga.masked_fill(x <= 0, 0)
    return gx, grad_b, grad_a


class _ShiftScaleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, spec: _Spec):
        need_gx, need_gb, need_ga = ctx.needs_input_grad[:3]
        if _use_triton(x):
            tri = _triton()
            xd = tri.dense(x)
            y = tri.forward(xd, shift, scale, spec.shift, spec.scale, spec.channel_dim, spec.relu)
        else:
            xd = x
            y = _torch_forward(x, shift, scale, spec)
        keep_x = need_ga or (spec.relu and need_gx)
        ctx.save_for_backward(xd if keep_x else None, shift, scale)
        ctx.spec = spec
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, shift, scale = ctx.saved_tensors
        spec: _Spec = ctx.spec
        need_gx, need_gb, need_ga = ctx.needs_input_grad[:3]
        if _use_triton(g):
            tri = _triton()
            ref = x if x is not None else tri.dense(g)  # x is only read for scale grads / ReLU
            gx, gb, ga = tri.backward(
                tri.like(g, ref), ref, shift, scale, spec.shift, spec.scale, spec.channel_dim,
                spec.relu, need_gx, need_gb, need_ga,
            )  # fmt: skip
            gb = gb.to(shift.dtype) if gb is not None else None
            ga = ga.to(scale.dtype) if ga is not None else None
        else:
            gx, gb, ga = _torch_backward(g, x, shift, scale, spec, need_gx, need_gb, need_ga)
        return gx, gb, ga, None


def _apply(x, p: torch.Tensor, mode: str, cd: int, op) -> torch.Tensor:
    p = p.to(x.dtype)
    if mode != "channel":
        return op(x, p)
    if isinstance(x, fx.Proxy):  # symbolic tracing: no ndim, so broadcast on the last dim
        return op(x.movedim(cd, -1), p).movedim(-1, cd)
    shape = [1] * x.dim()
    shape[cd] = -1
    return op(x, p.view(shape))


def _plain(x, shift, scale, spec: _Spec) -> torch.Tensor:
    """The reference ops (what ``ShiftScale`` computes unfused)."""
    if spec.relu:
        x = torch.relu(x)
    if shift is not None:
        x = _apply(x, shift, spec.shift, spec.channel_dim, torch.add)
    if scale is not None:
        x = _apply(x, scale, spec.scale, spec.channel_dim, torch.mul)
    return x


def shift_scale(
    x: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift_mode: str = "layer",
    scale_mode: str = "layer",
    channel_dim: int = 1,
    relu: bool = False,
) -> torch.Tensor:
    """``(x + shift) * scale`` (``(relu(x) + shift) * scale`` with ``relu``) as one fused op.

    ``shift``/``scale`` are a mode's parameter (``()`` layer, ``(C,)`` channel, the sample
    shape for element) or ``None``; ``channel_dim`` indexes ``x`` (batch included). The
    output has ``x``'s dtype and memory layout.
    """
    if shift is None:
        shift_mode = "none"
    if scale is None:
        scale_mode = "none"
    if isinstance(x, fx.Proxy) or torch.compiler.is_compiling():
        return _plain(x, shift, scale, _Spec(shift_mode, scale_mode, channel_dim, bool(relu)))
    spec = _Spec(shift_mode, scale_mode, channel_dim % max(1, x.dim()), bool(relu))
    if shift is None and scale is None:
        return _plain(x, shift, scale, spec)
    return _ShiftScaleFn.apply(x, shift, scale, spec)


def relu_shift_scale(
    x: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift_mode: str = "layer",
    scale_mode: str = "layer",
    channel_dim: int = 1,
) -> torch.Tensor:
    """``(relu(x) + shift) * scale`` in one pass; gradients masked by ``x > 0``."""
    return shift_scale(x, shift, scale, shift_mode, scale_mode, channel_dim, relu=True)
