"""Fused shift-scale modules and passes: :class:`ReLUShiftScale` (a ReLU merged into the
shift-scale after it), :func:`set_fused`, and the recorded passes :func:`fuse_relu` /
:func:`unfuse_relu`. The op itself is :mod:`surgeon.ops`.

Turn the op on per module with ``ShiftScale(..., fused=True)``, for a whole model with
``surgeon.insert(model, ..., fused=True)`` or :func:`set_fused`. Results match the plain
module within rounding; at init (shift 0, scale 1) the output equals the input exactly.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from .layers import ShiftScale
from .ops import shift_scale


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
