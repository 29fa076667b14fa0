"""The graph passes: insert shift/scale after each site, insert BatchNorm before each
activation, and strip what was inserted.

Every pass takes an ``nn.Module`` and returns an ``fx.GraphModule``; the caller's model is
left untouched (the pass works on a deep copy) and all options are checked before the
graph is changed. The passes applied to a model are recorded in ``gm.surgeon_record`` so
that :func:`surgeon.save` / :func:`surgeon.load` can replay them.
"""

from __future__ import annotations

import copy
import functools
import gc
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from . import eager, modsites, shapes
from . import sites as sites_mod
from .errors import SurgeryError, TraceError
from .layers import ChannelBatchNorm, ShiftScale, check_mode
from .models.sources import default_input_size
from .sites import Site
from .tracing import resolve_leaf_names, set_preserved, trace

SS_PREFIX = "ss_"
BN_PREFIX = "bn_"
FALLBACKS = ("auto", "eager", "never")  # when torch.fx cannot trace: eager if auto, always, never


@dataclass
class Analysis:
    """A traced, shape-propagated copy of a model and its sites."""

    gm: fx.GraphModule
    sites: list[Site]
    input_size: tuple[int, ...]
    leaf: list[str]
    method: str = "fx"  # "hybrid" when leaves hold module-level sites (surgeon.modsites)
    finals: list[dict] = field(default_factory=list)  # activations that are final: no site
    unreached: list[dict] = field(default_factory=list)  # activation calls no site reaches


def gc_paused(fn):
    """Run ``fn`` with Python's cyclic garbage collector paused.

    Tracing and shape propagation allocate hundreds of thousands of short-lived objects
    (nodes, proxies, meta tensors); each allocation burst starts collections that walk
    every live object, the whole model included (a tenth of an insert for large models).
    The cycles made meanwhile are collected after, as usual.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    return wrapper


def _record(model: nn.Module) -> dict[str, Any]:
    rec = getattr(model, "surgeon_record", None)
    if rec is None:
        src = getattr(model, "surgeon_source", None)
        rec = {"source": src, "passes": [], "sites": []}
    return copy.deepcopy(rec)


def _parse_input_size(input_size: Sequence[int] | str | None, model: nn.Module) -> tuple[int, ...]:
    if input_size is None:  # a surgered model keeps the size its passes used
        rec = getattr(model, "surgeon_record", None) or {}
        used = [p["input_size"] for p in rec.get("passes", []) if p.get("input_size")]
        return tuple(used[-1]) if used else default_input_size(model)
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


@gc_paused
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
    n_inputs = len(example_inputs) if example_inputs else 1
    gm = trace(model, leaf_types, n_inputs=n_inputs, compile=False)  # the passes recompile
    if getattr(model, "surgeon_source", None) is not None:
        set_preserved(gm, "surgeon_source", copy.deepcopy(model.surgeon_source))
    if example_inputs is None:
        example_inputs = shapes.example_inputs_for(size)
    found = modsites.propagate_with_leaves(gm, example_inputs, leaf_types)
    graph_sites = sites_mod.discover(gm)
    finals, unreached = modsites.graph_leftovers(gm, graph_sites)
    sites = modsites.merge(gm, graph_sites, found)
    method = "hybrid" if found.sites else "fx"
    names = [c if isinstance(c, str) else c.__name__ for c in leaf]
    return Analysis(
        gm, sites, size, names, method, finals + found.finals, unreached + found.unreached
    )


@gc_paused
def find_sites(
    model: nn.Module,
    *,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    input_size: Sequence[int] | str | None = None,
    example_inputs: Sequence[torch.Tensor] | None = None,
    leaf: Iterable[str | type] = (),
    fallback: str = "auto",
) -> list[Site]:
    """The sites ``insert`` would use, in graph order.

    ``fallback`` as in :func:`insert`: with ``auto`` (the default), the sites of the eager
    fallback when torch.fx cannot trace the model.
    """
    a, _ = _analyse_with_fallback(model, fallback, input_size, example_inputs, leaf)
    return sites_mod.select(a.sites, include, exclude)


def _analyse_with_fallback(
    model: nn.Module,
    fallback: str,
    input_size: Sequence[int] | str | None,
    example_inputs: Sequence[torch.Tensor] | None,
    leaf: Iterable[str | type],
) -> tuple[Analysis | eager.EagerAnalysis, TraceError | None]:
    """:func:`analyse`, or the eager fallback's analysis as ``fallback`` says. The second
    item is the tracer's error when ``auto`` fell back (None otherwise); an automatic
    fallback that reaches no activation call raises that error instead."""
    _check_fallback(fallback)
    try:
        if fallback == "eager":
            raise TraceError("eager insertion was asked for")
        return analyse(model, input_size=input_size, example_inputs=example_inputs, leaf=leaf), None
    except TraceError as exc:
        if fallback == "never":
            raise
        why = None if fallback == "eager" else exc
    size = _parse_input_size(input_size, model)
    inputs = example_inputs or shapes.example_inputs_for(size)
    a = eager.analyse_eager(model, inputs, _user_leaf_types(model, leaf))
    if why is not None:
        _check_reaches(a, why)
    return a, why


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


@gc_paused
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
    fallback: str = "auto",
) -> fx.GraphModule:
    """Insert ``ShiftScale(shift, scale)`` after the model's input and every non-final
    activation. Returns a new GraphModule that computes exactly the same outputs at init.

    Activation modules inside leaf modules get module-level sites (method ``hybrid``,
    :mod:`surgeon.modsites`). A model torch.fx cannot trace gets module-level sites only
    (method ``eager``, :mod:`surgeon.eager`): the result is then a copy of the model itself.
    ``surgeon_record["method"]`` says which: ``fx``, ``hybrid`` or ``eager``.

    Args:
        shift, scale: ``none``, ``element``, ``channel`` or ``layer``.
        include, exclude: site kinds (``input``, ``activation``, ``gate``, ``softmax``,
            ``norm_act``) or node-name globs.
        input_size: ``(C, H, W)`` for shape propagation; defaults to the model's own.
        example_inputs: tensors to propagate instead of a random input of ``input_size``.
        leaf: extra leaf module classes (or class names) for the tracer.
        fused: make the modules use the one-pass op of :mod:`surgeon.fused`.
        fallback: when torch.fx cannot trace the model: ``auto`` (the default) inserts at
            module level (the eager fallback) with a one-line warning, unless that reaches no
            activation call, when it raises the tracer's error; ``eager`` always inserts at
            module level; ``never`` raises the tracer's error.
    """
    check_mode(shift, "shift mode")
    check_mode(scale, "scale mode")
    include, exclude, leaf = list(include), list(exclude), list(leaf)
    record = _record(model)
    a, why = _analyse_with_fallback(model, fallback, input_size, example_inputs, leaf)
    if isinstance(a, eager.EagerAnalysis):
        size = _parse_input_size(input_size, model)
        return _insert_eager(
            a, model, shift, scale, record, why, fused, include, exclude, size, leaf
        )
    chosen = sites_mod.select(a.sites, include, exclude)
    gm, nodes = a.gm, {n.name: n for n in a.gm.graph.nodes}
    device = _device_of(gm)
    if shift != "none" or scale != "none":
        for site in chosen:
            if site.extra.get("method") == "module":  # inside a leaf: a hook on the module
                site.module = modsites.insert_module_site(gm, site, shift, scale, fused, device)
                continue
            site.module = _unique_name(gm, SS_PREFIX + site.name)
            module = ShiftScale(shift, scale, site.feature_shape, site.channel_dim, fused=fused)
            module = module.to(device)
            _insert_after(gm, nodes[site.name], site.module, module)
    else:
        chosen = []
    # replayed by surgeon.load with fallback "never": the same method, or an error
    record["passes"].append(
        _shift_scale_entry(
            model, shift, scale, include, exclude, a.input_size, a.leaf, fused, a.method, "never"
        )
    )
    record["sites"] = [s.to_dict() for s in chosen]
    record.update(method=a.method, finals=a.finals, unreached=a.unreached)
    _warn_mode(gm, record)
    return _finish(gm, record, model.training)


def _shift_scale_entry(
    model: nn.Module,
    shift: str,
    scale: str,
    include: list[str],
    exclude: list[str],
    size: Sequence[int],
    leaf: list[str],
    fused: bool,
    method: str,
    fallback: str,
) -> dict[str, Any]:
    """The record of one shift/scale pass: what surgeon.load needs to replay it."""
    return {
        "name": "shift_scale",
        "shift": shift,
        "scale": scale,
        "include": include,
        "exclude": exclude,
        "input_size": list(size),
        "leaf": leaf,
        "traced_in": "train" if model.training else "eval",
        "fused": bool(fused),
        "method": method,
        "fallback": fallback,
    }


def _check_reaches(a: eager.EagerAnalysis, exc: TraceError) -> None:
    """The automatic fallback is worth taking only if it reaches an activation call;
    otherwise the tracer's error (and its hint) is the useful answer."""
    if any(s.kind != "input" for s in a.sites) or not a.unreached:
        return
    calls = sum(u["calls"] for u in a.unreached)
    raise TraceError(
        f"{exc.message} (the module-level fallback reaches none of its {calls} activation calls)",
        hint="mark the module that does data-dependent control flow as a leaf with --leaf "
        "ClassName (module-level insertion cannot reach activation functions)",
    ) from exc


def _check_fallback(fallback: str) -> None:
    if fallback not in FALLBACKS:
        raise SurgeryError(f"invalid fallback {fallback!r}", hint=f"choose {', '.join(FALLBACKS)}")


def _user_leaf_types(model: nn.Module, leaf: Iterable[str | type]) -> list[type]:
    leaf = list(leaf)
    types = [c for c in leaf if isinstance(c, type)]
    return types + resolve_leaf_names(model, [c for c in leaf if isinstance(c, str)])


def _insert_eager(
    a: eager.EagerAnalysis,
    model: nn.Module,
    shift: str,
    scale: str,
    record: dict[str, Any],
    why: TraceError | None,
    fused: bool,
    include: list[str],
    exclude: list[str],
    size: tuple[int, ...],
    leaf: Iterable[str | type],
) -> nn.Module:
    """The eager fallback of :func:`insert`: hooks on the deep copy ``a.model``."""
    chosen = sites_mod.select(a.sites, include, exclude)
    if shift == "none" and scale == "none":
        chosen = []
    m = eager.insert_sites(a, chosen, shift, scale, fused)
    if why is not None:
        msg = f"{why.message}; inserted at module level instead (method: eager)"
        warnings.warn(msg, stacklevel=3)
        record.setdefault("warnings", []).append(msg)
    names = [c if isinstance(c, str) else c.__name__ for c in leaf]
    record["passes"].append(
        _shift_scale_entry(
            model, shift, scale, include, exclude, size, names, fused, "eager", "eager"
        )
    )
    record["sites"] = [s.to_dict() for s in chosen]
    record.update(method="eager", finals=a.finals, unreached=a.unreached)
    m.surgeon_record = record
    m.train(model.training)
    return m


@gc_paused
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
    method = (getattr(model, "surgeon_record", None) or {}).get("method")
    if not isinstance(model, fx.GraphModule) and method != "eager":
        raise SurgeryError(
            "strip needs a surgered GraphModule", hint="pass the model insert() returned"
        )
    gm = copy.deepcopy(model)
    modsites.detach_all(gm)  # module-level sites (hybrid and eager)
    if not isinstance(gm, fx.GraphModule):
        record = _record(gm)
        record["passes"] = [p for p in record["passes"] if p["name"] != "shift_scale"]
        record["sites"] = []
        gm.surgeon_record = record
        return gm
    # only the modules the shift/scale pass inserted: a ShiftScale that replaced a BatchNorm
    # (replace_norm) or absorbed one is part of the model's function and stays
    from .fused import ReLUShiftScale

    inserted = {s["module"] for s in _record(gm).get("sites", []) if s.get("module")}
    for node in list(gm.graph.nodes):
        if (
            node.op == "call_module"
            and node.target in inserted
            and isinstance(gm.get_submodule(node.target), ShiftScale)
        ):
            keep = node.args[0]
            if isinstance(gm.get_submodule(node.target), ReLUShiftScale):  # fuse_relu's merge
                with gm.graph.inserting_before(node):
                    keep = gm.graph.call_function(torch.relu, (node.args[0],))
            node.replace_all_uses_with(keep)
            gm.graph.erase_node(node)
            gm.delete_submodule(node.target)
    record = _record(gm)
    dropped = ("shift_scale", "fuse_relu", "unfuse_relu")
    record["passes"] = [p for p in record["passes"] if p["name"] not in dropped]
    record["sites"] = []
    return _finish(gm, record, model.training)
