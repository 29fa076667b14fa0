"""Fused shift-scale: ``y = (x + shift) * scale`` as one autograd op, optionally with the
preceding ReLU, ``y = (relu(x) + shift) * scale``.

Turn it on per module with ``ShiftScale(..., fused=True)``, for a whole model with
``surgeon.insert(model, ..., fused=True)`` or :func:`set_fused`, and merge ReLU + shift-scale
pairs of a surgered model with :func:`fuse_relu`. Results match the plain module within
rounding; at init (shift 0, scale 1) the output equals the input exactly.

- Forward is one pass: a Triton kernel on CUDA, ``addcmul(shift * scale, x, scale)`` (one
  elementwise kernel) elsewhere. Parameters stay fp32 and are cast to ``x``'s dtype.
- Backward: ``grad_x = grad * scale`` (masked by ``x > 0`` with ReLU);
  ``grad_shift = sum(grad * scale)``, ``grad_scale = sum(grad * (x + shift))``, summed to the
  parameter's shape in fp32. On CUDA that is one pass over ``grad`` and ``x``.
- Memory: the op saves ``x`` (the tensor the preceding op already keeps for its own backward:
  ReLU saves its output, which is this input) and the parameters; the unfused module also
  keeps ``x + shift``, one more activation-sized buffer per site. The PyTorch backward uses
  one transient activation-sized buffer (``grad * (x + shift)``), freed before returning.
- Under ``torch.compile`` and FX tracing the plain ops run instead, so Inductor fuses them
  with their neighbours itself.
"""

from __future__ import annotations

import copy
import os
from typing import NamedTuple

import torch
from torch import fx, nn

from .layers import ShiftScale

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
            from . import _fused_triton
        except Exception:  # no triton, or a broken install: the PyTorch path
            _triton_failed = True
        else:
            _triton_mod = _fused_triton
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


class ReLUShiftScale(ShiftScale):
    """``y = (relu(x) + shift) * scale``: a ReLU merged into the shift-scale after it.

    Same parameters (and state-dict keys) as the :class:`ShiftScale` it replaces; made by
    :func:`fuse_relu`, undone by :func:`unfuse_relu`.
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
        return _rebuild(cls, m, fused=True)

    def extra_repr(self) -> str:
        return "relu, " + super().extra_repr()


def set_fused(model: nn.Module, fused: bool = True) -> nn.Module:
    """Switch every :class:`ShiftScale` of ``model`` to the fused op (or back); in place."""
    for m in model.modules():
        if isinstance(m, ShiftScale):
            m.fused = bool(fused)
    return model


_RELU_FUNCS = (torch.relu, torch.relu_, nn.functional.relu, nn.functional.relu_)


def _relu_input(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The input of ``node`` if it is a ReLU that can be merged into its only user."""
    if not isinstance(node, fx.Node) or len(node.users) != 1:
        return None
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if type(mod) is not nn.ReLU:
            return None
        inplace = mod.inplace
    elif node.op == "call_function" and node.target in _RELU_FUNCS:
        inplace = node.target in (torch.relu_, nn.functional.relu_) or bool(
            node.kwargs.get("inplace", False) or (len(node.args) > 1 and node.args[1])
        )
    elif node.op == "call_method" and node.target in ("relu", "relu_"):
        inplace = node.target == "relu_"
    else:
        return None
    src = node.args[0] if node.args else None
    if not isinstance(src, fx.Node):
        return None
    if inplace and len(src.users) > 1:  # others see the in-place ReLU's result
        return None
    return src


def _finish(gm: fx.GraphModule, model: fx.GraphModule, name: str) -> fx.GraphModule:
    """Recompile; record the pass (``surgeon.load`` replays it) when the model has a record."""
    from .tracing import set_preserved

    gm.graph.lint()
    gm.recompile()
    gm.train(model.training)
    rec = getattr(model, "surgeon_record", None)
    if rec is not None:
        rec = copy.deepcopy(rec)
        rec.setdefault("passes", []).append({"name": name})
        set_preserved(gm, "surgeon_record", rec)
    return gm


def fuse_relu(model: fx.GraphModule) -> fx.GraphModule:
    """Merge each ReLU whose only user is a :class:`ShiftScale` into one
    :class:`ReLUShiftScale` (same module name and parameters), on a copy.

    The state dict is unchanged; the pass is recorded, so :func:`surgeon.load` replays it.
    :func:`surgeon.strip` keeps the ReLU of a merged module.
    """
    if not isinstance(model, fx.GraphModule):
        raise TypeError("fuse_relu needs a surgered GraphModule (the model insert() returned)")
    gm = copy.deepcopy(model)
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, ShiftScale) or isinstance(mod, ReLUShiftScale):
            continue
        relu = node.args[0]
        src = _relu_input(relu, gm)
        if src is None:
            continue
        _set_submodule(gm, node.target, ReLUShiftScale.from_module(mod))
        node.replace_input_with(relu, src)
        gm.graph.erase_node(relu)
        if relu.op == "call_module" and not any(
            n.op == "call_module" and n.target == relu.target for n in gm.graph.nodes
        ):
            gm.delete_submodule(relu.target)
    return _finish(gm, model, "fuse_relu")


def unfuse_relu(model: fx.GraphModule) -> fx.GraphModule:
    """Split each :class:`ReLUShiftScale` back into ``torch.relu`` + :class:`ShiftScale`."""
    gm = copy.deepcopy(model)
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, ReLUShiftScale):
            continue
        plain = _rebuild(ShiftScale, mod, fused=mod.fused)
        _set_submodule(gm, node.target, plain)
        with gm.graph.inserting_before(node):
            relu = gm.graph.call_function(torch.relu, (node.args[0],))
        node.replace_input_with(node.args[0], relu)
    return _finish(gm, model, "unfuse_relu")


def _rebuild(cls: type, m: ShiftScale, fused: bool) -> ShiftScale:
    """A ``cls`` module with ``m``'s modes and the very same parameters."""
    new = cls(m.shift_mode, m.scale_mode, m.feature_shape, m.channel_dim, fused=fused)
    new.register_parameter("shift", m.shift)
    new.register_parameter("scale", m.scale)
    return new.train(m.training)


def _set_submodule(gm: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)
