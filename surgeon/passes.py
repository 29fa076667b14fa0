"""The graph passes: insert shift/scale after each site, insert BatchNorm before each
activation, and strip what was inserted.

Every pass takes an ``nn.Module`` and returns an ``fx.GraphModule``; the caller's model is
left untouched (the pass works on a deep copy) and all options are checked before the
graph is changed. The passes applied to a model are recorded in ``gm.surgeon_record`` so
that :func:`surgeon.save` / :func:`surgeon.load` can replay them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from . import shapes
from . import sites as sites_mod
from .errors import SurgeryError
from .layers import ChannelBatchNorm, ShiftScale, check_mode
from .models.sources import default_input_size
from .sites import Site
from .tracing import resolve_leaf_names, set_preserved, trace

SS_PREFIX = "ss_"
BN_PREFIX = "bn_"


@dataclass
class Analysis:
    """A traced, shape-propagated copy of a model and its sites."""

    gm: fx.GraphModule
    sites: list[Site]
    input_size: tuple[int, ...]
    leaf: list[str]


def _record(model: nn.Module) -> dict[str, Any]:
    rec = getattr(model, "surgeon_record", None)
    if rec is None:
        src = getattr(model, "surgeon_source", None)
        rec = {"source": src, "passes": [], "sites": []}
    return copy.deepcopy(rec)


def _parse_input_size(input_size: Sequence[int] | str | None, model: nn.Module) -> tuple[int, ...]:
    if input_size is None:
        return default_input_size(model)
    if isinstance(input_size, str):
        try:  # "3,32,32" or "3x32x32"
            input_size = [int(s) for s in input_size.replace("x", ",").split(",")]
        except ValueError:
            raise SurgeryError(
                f"bad input size {input_size!r}", hint="write C,H,W, e.g. 3,32,32"
            ) from None
    size = tuple(int(s) for s in input_size)
    if not size or any(s <= 0 for s in size):
        raise SurgeryError(f"bad input size {size}", hint="write positive C,H,W, e.g. 3,32,32")
    return size


def analyse(
    model: nn.Module,
    *,
    input_size: Sequence[int] | str | None = None,
    example_inputs: Sequence[torch.Tensor] | None = None,
    leaf: Iterable[str | type] = (),
) -> Analysis:
    """Trace a copy of ``model``, propagate shapes and find its sites."""
    leaf = list(leaf)
    leaf_types = [c for c in leaf if isinstance(c, type)]
    leaf_types += resolve_leaf_names(model, [c for c in leaf if isinstance(c, str)])
    size = _parse_input_size(input_size, model)
    gm = trace(model, leaf_types)
    if getattr(model, "surgeon_source", None) is not None:
        set_preserved(gm, "surgeon_source", copy.deepcopy(model.surgeon_source))
    if example_inputs is None:
        example_inputs = shapes.example_inputs_for(size)
    shapes.propagate(gm, example_inputs)
    names = [c if isinstance(c, str) else c.__name__ for c in leaf]
    return Analysis(gm, sites_mod.discover(gm), size, names)


def find_sites(
    model: nn.Module,
    *,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    input_size: Sequence[int] | str | None = None,
    example_inputs: Sequence[torch.Tensor] | None = None,
    leaf: Iterable[str | type] = (),
) -> list[Site]:
    """The sites ``insert`` would use, in graph order."""
    a = analyse(model, input_size=input_size, example_inputs=example_inputs, leaf=leaf)
    return sites_mod.select(a.sites, include, exclude)


def _unique_name(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _device_of(gm: nn.Module) -> torch.device:
    for p in gm.parameters():
        return p.device
    return torch.device("cpu")


def _insert_after(gm: fx.GraphModule, node: fx.Node, name: str, module: nn.Module) -> fx.Node:
    gm.add_submodule(name, module)
    anchor = node
    if node.op == "placeholder":  # keep placeholders together at the top of the graph
        anchor = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(anchor):
        new = gm.graph.call_module(name, (node,))
    for user in list(node.users):
        if user is not new:
            user.replace_input_with(node, new)
    return new


def _warn_mode(gm: fx.GraphModule, record: dict[str, Any]) -> None:
    if getattr(gm, "surgeon_mode_dependent", False):
        mode = "train" if gm.training else "eval"
        msg = (
            f"the model branches on self.training outside leaf modules; the graph keeps {mode}-mode "
            "behaviour in both modes (make the branching module a leaf with --leaf, or insert "
            "in the mode the model will run in)"
        )
        if msg not in record.setdefault("warnings", []):
            record["warnings"].append(msg)


def _finish(gm: fx.GraphModule, record: dict[str, Any], training: bool) -> fx.GraphModule:
    gm.graph.lint()
    gm.recompile()
    set_preserved(gm, "surgeon_record", record)
    gm.train(training)
    return gm


def insert(
    model: nn.Module,
    shift: str = "layer",
    scale: str = "layer",
    *,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    input_size: Sequence[int] | str | None = None,
    example_inputs: Sequence[torch.Tensor] | None = None,
    leaf: Iterable[str | type] = (),
    fused: bool = False,
) -> fx.GraphModule:
    """Insert ``ShiftScale(shift, scale)`` after the model's input and every non-final
    activation. Returns a new GraphModule that computes exactly the same outputs at init.

    Args:
        shift, scale: ``none``, ``element``, ``channel`` or ``layer``.
        include, exclude: site kinds (``input``, ``activation``, ``gate``, ``softmax``,
            ``norm_act``) or node-name globs.
        input_size: ``(C, H, W)`` for shape propagation; defaults to the model's own.
        example_inputs: tensors to propagate instead of a random input of ``input_size``.
        leaf: extra leaf module classes (or class names) for the tracer.
        fused: make the modules use the one-pass op of :mod:`surgeon.fused`.
    """
    check_mode(shift, "shift mode")
    check_mode(scale, "scale mode")
    include, exclude = list(include), list(exclude)
    record = _record(model)
    a = analyse(model, input_size=input_size, example_inputs=example_inputs, leaf=leaf)
    chosen = sites_mod.select(a.sites, include, exclude)
    gm, nodes = a.gm, {n.name: n for n in a.gm.graph.nodes}
    device = _device_of(gm)
    if shift != "none" or scale != "none":
        for site in chosen:
            site.module = _unique_name(gm, SS_PREFIX + site.name)
            module = ShiftScale(shift, scale, site.feature_shape, site.channel_dim, fused=fused)
            module = module.to(device)
            _insert_after(gm, nodes[site.name], site.module, module)
    else:
        chosen = []
    record["passes"].append(
        {
            "name": "shift_scale",
            "shift": shift,
            "scale": scale,
            "include": include,
            "exclude": exclude,
            "input_size": list(a.input_size),
            "leaf": a.leaf,
            "traced_in": "train" if model.training else "eval",
            "fused": bool(fused),
        }
    )
    record["sites"] = [s.to_dict() for s in chosen]
    _warn_mode(gm, record)
    return _finish(gm, record, model.training)


def insert_batchnorm(
    model: nn.Module,
    *,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    input_size: Sequence[int] | str | None = None,
    leaf: Iterable[str | type] = (),
) -> fx.GraphModule:
    """Insert BatchNorm (1d/2d/3d as the shape requires) before each non-final activation.

    Only plain activations get one (not inputs, gates, softmax or fused norm+act layers).
    """
    include, exclude = list(include), list(exclude)
    record = _record(model)
    a = analyse(model, input_size=input_size, leaf=leaf)
    chosen = [s for s in sites_mod.select(a.sites, include, exclude) if s.kind == "activation"]
    gm, nodes = a.gm, {n.name: n for n in a.gm.graph.nodes}
    device = _device_of(gm)
    added = []
    for site in chosen:
        node = nodes[site.name]
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if src is None or sites_mod._is_mul(node) or (_is_inplace(node, gm) and len(src.users) > 1):
            continue  # an in-place activation on a shared tensor: a BN in between changes semantics
        shape = shapes.node_shape(src)
        if shape is None or len(shape) < 2:
            continue
        cdim = sites_mod.infer_channel_dim(src, gm)
        name = _unique_name(gm, BN_PREFIX + site.name)
        gm.add_submodule(name, ChannelBatchNorm(shape[cdim], len(shape), cdim).to(device))
        with gm.graph.inserting_before(node):
            bn = gm.graph.call_module(name, (src,))
        node.replace_input_with(src, bn)
        added.append(name)
    record["passes"].append(
        {
            "name": "batchnorm",
            "include": include,
            "exclude": exclude,
            "input_size": list(a.input_size),
            "leaf": a.leaf,
            "traced_in": "train" if model.training else "eval",
        }
    )
    record["batchnorm"] = added
    _warn_mode(gm, record)
    return _finish(gm, record, model.training)


def _is_inplace(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_")
    return bool(node.kwargs.get("inplace", False)) or getattr(node.target, "__name__", "").endswith(
        "_"
    )


def inserted_modules(model: nn.Module) -> dict[str, ShiftScale]:
    """The shift/scale modules of a surgered model, by module name, in graph order."""
    rec = getattr(model, "surgeon_record", None) or {}
    names = [s["module"] for s in rec.get("sites", []) if s.get("module")]
    return {n: model.get_submodule(n) for n in names}


def strip(model: fx.GraphModule) -> fx.GraphModule:
    """Remove the inserted shift/scale modules: the original computation, on a copy."""
    if not isinstance(model, fx.GraphModule):
        raise SurgeryError(
            "strip needs a surgered GraphModule", hint="pass the model insert() returned"
        )
    gm = copy.deepcopy(model)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), ShiftScale):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            gm.delete_submodule(node.target)
    record = _record(gm)
    record["passes"] = [p for p in record["passes"] if p["name"] != "shift_scale"]
    record["sites"] = []
    return _finish(gm, record, model.training)
