"""Module-level sites: activation modules that the graph does not reach.

Two cases need them: leaf modules the tracer does not enter (timm's ``MobileVitBlock``,
``LiteMLA``, ``TinyVitBlock``, ..., and classes registered with ``register_leaf_module``)
and models torch.fx cannot trace at all (the eager fallback, :mod:`surgeon.eager`).
A module-level site (:class:`surgeon.sites.ModuleSite`) is an activation module (or a fused
norm+activation module) inside such a region. Shapes and the activation calls no site
reaches come from one observed run (:mod:`surgeon.observer`). Classes named with ``--leaf``
stay opaque, and so do torch.nn blocks such as ``nn.TransformerEncoderLayer``, whose fast
paths may bypass their submodules.
"""

from __future__ import annotations

import types
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from . import registry, shapes
from .attach import has_attached
from .layers import ShiftScale
from .observer import Call, Observer
from .shapes import node_dtype
from .sites import (
    ModuleSite,
    Site,
    _site_node_for_gate,
    classify,
    final_nodes,
)

# torch.nn modules a walk may enter: plain containers, which call what they hold
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def activation_modules(
    root: nn.Module, prefix: str = "", opaque: Sequence[type] = (), enter_all: bool = False
) -> dict[str, tuple[nn.Module, str, bool]]:
    """The outermost registered activation / norm+act modules under ``root``:
    ``{path: (module, kind, gate_candidate)}``, not entering ``opaque`` classes, shift/scale
    modules or torch.nn blocks other than containers (all of them with ``enter_all``)."""
    found: dict[str, tuple[nn.Module, str, bool]] = {}
    seen: set[int] = set()

    def walk(m: nn.Module, path: str) -> None:
        for name, child in m.named_children():
            p = f"{path}.{name}" if path else name
            if id(child) in seen or isinstance(child, (ShiftScale, *opaque)):
                continue
            seen.add(id(child))
            hit = registry.lookup_module(child)
            if hit is not None:
                found[p] = (child, *hit)
            elif enter_all or not is_torch_block(child):
                walk(child, p)

    walk(root, prefix)
    return found


def is_torch_block(m: nn.Module) -> bool:
    """A torch.nn module that is not a plain container (its forward may skip its children)."""
    return type(m).__module__.startswith("torch.") and not isinstance(m, _CONTAINERS)


# ---------------------------------------------------------------- sites from the observations


@dataclass
class Found:
    """What an observed run gives: module-level sites, final activations, unreached calls."""

    sites: list[Site]
    finals: list[dict]
    unreached: list[dict]


def _channel_dim(shape: tuple[int, ...], layout: str | None) -> int:
    ndim = len(shape)
    if layout == "first" and ndim >= 2:
        return 1
    if layout == "last" and ndim >= 2:
        return ndim - 1
    return 1 if ndim >= 4 else max(ndim - 1, 1)


def collect(
    obs: Observer,
    kinds: dict[str, tuple[str, bool]],
    free_scopes: Iterable[str],
    describe,
) -> Found:
    """Turn the observed calls into sites (grouped by module), finals and unreached calls.

    ``kinds`` maps each target path to ``(kind, gate_candidate)``; a call is final when its
    scope reaches the model output freely (``free_scopes``) and no parametrised module ran
    after it in that scope; ``describe(call)`` words why a call is unreached.
    """
    free = set(free_scopes)
    by_key: dict[tuple[str, str, bool], list[Call]] = defaultdict(list)
    for c in obs.final_calls():
        by_key[(c.path, c.target, c.site)].append(c)
    found = Found([], [], [])
    for (path, target, site), calls in by_key.items():
        final = all(c.scope in free and obs.is_last_in_scope(c) for c in calls)
        entry = {"name": path, "target": target, "calls": len(calls)}
        if final:
            found.finals.append(entry)
            continue
        if not site:
            entry["reason"] = describe(calls[0])
            found.unreached.append(entry)
            continue
        shapes = {c.shape[1:] if c.shape else None for c in calls}
        c0 = calls[0]
        if c0.shape is None or c0.dtype is None or not c0.dtype.is_floating_point:
            entry["reason"] = "its output is not a floating-point tensor"
            found.unreached.append(entry)
            continue
        if len(shapes) > 1:
            entry["reason"] = f"one module called {len(calls)} times with different shapes"
            found.unreached.append(entry)
            continue
        kind, _gate = kinds[path]
        extra = {"method": "module", "scope": c0.scope, "calls": len(calls)}
        found.sites.append(
            ModuleSite(
                index=0,
                name=path,
                kind=kind,
                target=target,
                shape=(-1, *c0.shape[1:]),
                channel_dim=_channel_dim(c0.shape, c0.layout),
                extra=extra,
            )
        )
    return found


# ---------------------------------------------------------------- leaves of a traced graph


def _scope_reason(scope: nn.Module, path: str, user: bool):
    cls = type(scope).__name__

    def reason(call: Call) -> str:
        target = call.target
        if user:
            return f"inside leaf {cls} ({path}), kept opaque by --leaf"
        if is_torch_block(scope):
            return f"inside torch.nn leaf {cls} ({path}), whose fast path may skip its submodules"
        return (
            f"{target} inside leaf {cls} ({path}) is not an activation module "
            "(function calls inside a leaf cannot get a module-level site)"
        )

    return reason


class _ScopedFunction:
    """Stands for the target of a ``call_function`` node while shapes propagate: calls
    the function inside an observer scope named after the node."""

    def __init__(self, fn, obs: Observer, path: str) -> None:
        self.fn, self.obs, self.path = fn, obs, path

    def __call__(self, *args, **kwargs):
        self.obs.enter(self.path)
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.obs.leave()


def _kept_whole(node: fx.Node) -> bool:
    """A ``call_function`` node of a Python function FX did not enter (``torch.fx.wrap``,
    timm's autowrap functions): activation calls inside it are not graph nodes."""
    fn = node.target
    mod = getattr(fn, "__module__", None) or ""
    return (
        node.op == "call_function"
        and isinstance(fn, types.FunctionType)
        and mod.split(".")[0] not in ("torch", "operator", "_operator", "builtins", "math")
        and fn not in registry.ACT_FUNCTIONS
    )


def propagate_with_leaves(
    gm: fx.GraphModule,
    example_inputs: Sequence[torch.Tensor],
    user_leaves: Sequence[type],
    final: str = "parametrised",
) -> Found:
    """Propagate shapes through ``gm`` and find the module-level sites inside its leaves.

    A leaf is a ``call_module`` node that is neither an activation nor a shift/scale
    module. Activation modules inside leaves that are not torch.nn blocks and not named with
    ``--leaf`` get sites; every other activation call inside a leaf is listed as unreached.
    """
    user = tuple(user_leaves)
    graph_targets: dict[str, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            graph_targets[node.target].append(node)
    in_graph = {id(gm.get_submodule(t)) for t in graph_targets}
    scopes: dict[str, nn.Module] = {}
    targets: dict[str, nn.Module] = {}
    others: dict[str, nn.Module] = {}
    kinds: dict[str, tuple[str, bool]] = {}
    reasons = {}
    for path in graph_targets:
        mod = gm.get_submodule(path)
        if isinstance(mod, ShiftScale) or registry.lookup_module(mod) is not None:
            continue
        if not any(True for _ in mod.children()) and is_torch_block(mod):
            continue  # Conv2d, Linear, ...: nothing inside
        everything = activation_modules(mod, path, enter_all=True)
        if not everything and isinstance(mod, shapes.shape_preserving_types()):
            continue  # a norm layer without an activation (BatchNormAct2d(apply_act=False))
        is_user = isinstance(mod, user)
        reachable = {}
        if not is_user and not is_torch_block(mod):
            reachable = activation_modules(mod, path, opaque=user)
        for p, (m, kind, gate) in everything.items():
            if has_attached(m):
                continue  # already surgered at module level
            if p in reachable and id(m) not in in_graph:
                targets[p], kinds[p] = m, (kind, gate)
            else:
                others[p] = m
        scopes[path] = mod
        reasons[path] = _scope_reason(mod, path, is_user)
    functions = [n for n in gm.graph.nodes if _kept_whole(n)]
    if not scopes and not functions:
        shapes.propagate(gm, example_inputs)
        return Found([], [], [])
    for node in functions:
        fn = node.target
        name = f"{fn.__module__}.{fn.__qualname__}"
        reasons[node.name] = lambda call, name=name, node=node.name: (
            f"{call.target} inside {name} ({node}), a function FX keeps as one node"
        )
    obs = Observer(scopes, targets, others)
    try:
        for node in functions:
            node.target = _ScopedFunction(node.target, obs, node.name)
        with obs:
            shapes.propagate(gm, example_inputs)
    finally:
        for node in functions:
            if isinstance(node.target, _ScopedFunction):
                node.target = node.target.fn
    free_nodes = final_nodes(gm, final)
    free = {p for p in scopes if all(n in free_nodes for n in graph_targets[p])}
    free |= {n.name for n in functions if n in free_nodes}
    found = collect(obs, kinds, free, lambda call: reasons[call.scope](call))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for s in found.sites:
        s.extra["position"] = order[graph_targets[s.extra["scope"]][0]]
    return found


def graph_leftovers(
    gm: fx.GraphModule, sites: Sequence[Site], final: str = "parametrised"
) -> tuple[list[dict], list[dict]]:
    """Activation nodes of the graph that are not sites: ``(finals, unreached)``."""
    names = {s.name for s in sites}
    free = final_nodes(gm, final)
    finals, unreached = [], []
    for node in gm.graph.nodes:
        hit = classify(node, gm)
        if hit is None:
            continue
        site_node, target = node, hit[1]
        if hit[2]:
            gated = _site_node_for_gate(node)
            if gated is not None:
                site_node = gated[1]
        if site_node.name in names:
            continue
        entry = {"name": node.name, "target": target, "calls": 1}
        if site_node in free:
            finals.append(entry)
        else:
            dtype = node_dtype(site_node)
            entry["reason"] = (
                "its output is not a floating-point tensor"
                if dtype is None or not dtype.is_floating_point
                else f"its value is already a site ({site_node.name})"
            )
            unreached.append(entry)
    return finals, unreached


def merge(gm: fx.GraphModule, graph_sites: list[Site], found: Found) -> list[Site]:
    """Graph sites and module-level sites in graph order (a leaf's after the leaf), re-indexed."""
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    keyed = [((order.get(s.name, 0), 0, i), s) for i, s in enumerate(graph_sites)]
    keyed += [((s.extra.pop("position"), 1, i), s) for i, s in enumerate(found.sites)]
    merged = [s for _, s in sorted(keyed, key=lambda t: t[0])]
    for i, s in enumerate(merged):
        s.index = i
    return merged
