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

from ..attach import set_submodule
from ..layers import ReLUShiftScale, ShiftScale
from ..record import PassEntry, SurgeryRecord, finish, register_pass

__all__ = ["ReLUShiftScale", "fuse_relu", "set_fused", "unfuse_relu"]


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


def _finish(gm: fx.GraphModule, model: nn.Module, name: str) -> fx.GraphModule:
    record = SurgeryRecord.of(model)
    record.passes.append(PassEntry(name))
    return finish(gm, record, model.training)


@register_pass("fuse_relu", replay=lambda model, entry: fuse_relu(model))
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
        set_submodule(gm, node.target, ReLUShiftScale.from_module(mod))
        node.replace_input_with(relu, src)
        gm.graph.erase_node(relu)
        if relu.op == "call_module" and not any(
            n.op == "call_module" and n.target == relu.target for n in gm.graph.nodes
        ):
            gm.delete_submodule(relu.target)
    return _finish(gm, model, "fuse_relu")


@register_pass("unfuse_relu", replay=lambda model, entry: unfuse_relu(model))
def unfuse_relu(model: fx.GraphModule) -> fx.GraphModule:
    """Split each :class:`ReLUShiftScale` back into ``torch.relu`` + :class:`ShiftScale`."""
    gm = copy.deepcopy(model)
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, ReLUShiftScale):
            continue
        plain = mod.rebuilt_as(ShiftScale, fused=mod.fused)
        set_submodule(gm, node.target, plain)
        with gm.graph.inserting_before(node):
            relu = gm.graph.call_function(torch.relu, (node.args[0],))
        node.replace_input_with(node.args[0], relu)
    return _finish(gm, model, "unfuse_relu")
