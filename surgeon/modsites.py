"""Module-level sites: activation modules that the graph does not reach.

Two cases need them: leaf modules the tracer does not enter (timm's ``MobileVitBlock``,
``LiteMLA``, ``TinyVitBlock``, ..., and classes registered with ``register_leaf_module``)
and models torch.fx cannot trace at all (the eager fallback, :mod:`surgeon.eager`).

A module-level site is an activation module (or a fused norm+activation module) inside such
a region. Its shift/scale module becomes a child ``ss`` of the activation module, applied to
its output by a forward hook (:class:`ApplyChild`): the activation keeps its type, its
parameter names and its place in its parent, and the hook survives ``copy.deepcopy``.

Shapes come from forward hooks during one run on meta, fake or real tensors. The same run
counts, with a ``TorchFunctionMode``, the activation *functions* called where no module-level
site can reach them (``attn.softmax(-1)`` inside a leaf); they are reported as unreached.
Classes named with ``--leaf`` stay opaque, and so do torch.nn blocks such as
``nn.TransformerEncoderLayer``, whose fast paths may bypass their submodules.
"""

from __future__ import annotations

import types
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from . import registry, shapes
from .layers import ShiftScale
from .shapes import node_dtype
from .sites import (
    Site,
    _describe,
    _site_node_for_gate,
    classify,
    module_layout,
    reaches_output_freely,
)

SS_CHILD = "ss"
# torch.nn modules a walk may enter: plain containers, which call what they hold
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class ApplyChild:
    """Forward hook: pass the module's output through its child module ``name``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module: nn.Module, args, output):
        return getattr(module, self.name)(output) if isinstance(output, torch.Tensor) else None


class ApplyChildToInput:
    """Forward pre-hook (with kwargs): pass the first input, positional or named ``param``,
    through the child module ``name``."""

    def __init__(self, name: str, param: str) -> None:
        self.name, self.param = name, param

    def __call__(self, module: nn.Module, args, kwargs):
        child = getattr(module, self.name)
        if args and isinstance(args[0], torch.Tensor):
            return (child(args[0]), *args[1:]), kwargs
        if isinstance(kwargs.get(self.param), torch.Tensor):
            return args, {**kwargs, self.param: child(kwargs[self.param])}
        return None


def _free_name(module: nn.Module, base: str) -> str:
    name, i = base, 1
    while hasattr(module, name):
        name, i = f"{base}_{i}", i + 1
    return name


def attach_after(module: nn.Module, ss: nn.Module) -> str:
    """Make ``ss`` a child of ``module`` applied to its output; return the child's name."""
    name = _free_name(module, SS_CHILD)
    module.add_module(name, ss)
    module.register_forward_hook(ApplyChild(name))
    return name


def attach_before(root: nn.Module, ss: nn.Module, param: str) -> str:
    """Make ``ss`` a child of ``root`` applied to its first input; return the child's name."""
    name = _free_name(root, f"ss_{param}")
    root.add_module(name, ss)
    root.register_forward_pre_hook(ApplyChildToInput(name, param), with_kwargs=True)
    return name


def has_attached(module: nn.Module) -> bool:
    return any(isinstance(h, ApplyChild) for h in module._forward_hooks.values())


def detach_all(model: nn.Module) -> int:
    """Remove every hook-applied shift/scale module; return how many were removed."""
    removed = 0
    for m in list(model.modules()):
        for hooks, extra in (
            (m._forward_hooks, ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")),
            (m._forward_pre_hooks, ("_forward_pre_hooks_with_kwargs",)),
        ):
            for key, hook in list(hooks.items()):
                if not isinstance(hook, (ApplyChild, ApplyChildToInput)):
                    continue
                del hooks[key]
                for attr in extra:
                    getattr(m, attr, {}).pop(key, None)
                if hook.name in m._modules:
                    del m._modules[hook.name]
                removed += 1
    return removed


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


# ---------------------------------------------------------------- observing one forward run


@dataclass
class Call:
    """One activation call seen during the run."""

    path: str  # the activation module, or the innermost module around a function call
    target: str  # nn.ReLU, F.softmax, Tensor.sigmoid, ...
    scope: str  # the leaf (or root) it happened in
    inv: int  # which call of that scope
    seq: int  # when it ended
    tag: str  # meta, fake or real: which attempt of the run
    site: bool  # a module that gets a module-level site (else: unreachable)
    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    layout: str | None = None  # "first"/"last" from the layer that produced its input


def _tag(obj) -> str | None:
    if isinstance(obj, (tuple, list)):
        return next((t for t in map(_tag, obj) if t is not None), None)
    if isinstance(obj, dict):
        return _tag(list(obj.values()))
    if not isinstance(obj, torch.Tensor):
        return None
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(obj, FakeTensor):
        return "fake"
    return "meta" if obj.is_meta else "real"


def activation_target(func) -> str | None:
    """The descriptor of a registered activation function or Tensor method, else None."""
    try:
        entry = registry.ACT_FUNCTIONS.get(func)
    except TypeError:  # unhashable
        return None
    if entry is not None:
        return _describe(func)
    name = getattr(func, "__name__", None)
    if name in registry.ACT_METHODS and getattr(torch.Tensor, name, None) is func:
        return _describe(name)
    return None


class _Functions(TorchFunctionMode):
    def __init__(self, obs: Observer) -> None:
        super().__init__()
        self.obs = obs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        obs = self.obs
        if obs.scopes and not obs.act_depth:
            target = activation_target(func)
            if target is not None:
                obs.record(obs.stack[-1] if obs.stack else obs.scopes[-1][0], target, False, out)
        return out


class Observer:
    """Watch a forward run inside ``scopes`` (``{path: module}``): the output shape of each
    call of the activation modules in ``targets``, the activation calls nothing reaches, and
    when parametrised modules run (for finality). Use as a context manager."""

    def __init__(
        self,
        scopes: dict[str, nn.Module],
        targets: dict[str, nn.Module],
        others: dict[str, nn.Module] | None = None,
    ) -> None:
        self.scope_modules, self.targets = scopes, targets
        self.others = others or {}  # activation modules that get no site (counted, unreached)
        self.calls: list[Call] = []
        self.last_param: dict[int, int] = {}  # scope call -> seq of its last parametrised module
        self.scopes: list[tuple[str, int]] = []
        self.stack: list[str] = []
        self.act_depth = 0
        self.seq = self.inv = 0
        self._handles: list = []
        self._mode: _Functions | None = None
        self._layout: dict[int, tuple[str, tuple[int, ...]]] = {}
        self._inputs: dict[str, list[tuple[int, ...] | None]] = defaultdict(list)

    # hooks
    def _scope_pre(self, path: str):
        def hook(module, args):
            self.inv += 1
            if not self.scopes:
                self._functions_on()
            self.scopes.append((path, self.inv))

        return hook

    def _scope_post(self, module, args, output):
        if self.scopes:
            self.scopes.pop()
            if not self.scopes:
                self._functions_off()

    # The function mode is on only inside a scope: outside, every torch call of the run
    # (and of the shape recorder) would pay for it.
    def _functions_on(self) -> None:
        if self._mode is None:
            self._mode = _Functions(self)
            self._mode.__enter__()

    def _functions_off(self) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)

    def enter(self, path: str) -> None:
        """Enter a scope that is not a module (a function the graph keeps whole)."""
        self._scope_pre(path)(None, ())

    def leave(self) -> None:
        self._scope_post(None, (), None)

    def _module_pre(self, path: str, has_params: bool):
        def hook(module, args):
            self.stack.append(path)
            if has_params and self.scopes and not self.act_depth:
                self.seq += 1
                self.last_param[self.scopes[-1][1]] = self.seq

        return hook

    def _module_post(self, layout: str | None):
        def hook(module, args, output):
            if self.stack:
                self.stack.pop()
            if layout and self.scopes and isinstance(output, torch.Tensor):
                self._layout[self.scopes[-1][1]] = (layout, tuple(output.shape))

        return hook

    def _act_pre(self, path: str):
        def hook(module, args):
            if not self.act_depth and self.scopes:
                x = args[0] if args and isinstance(args[0], torch.Tensor) else None
                last = self._layout.get(self.scopes[-1][1])
                ok = x is not None and last is not None and last[1] == tuple(x.shape)
                self._inputs[path].append(last[0] if ok else None)
            self.act_depth += 1

        return hook

    def _act_post(self, path: str, site: bool, target: str):
        def hook(module, args, output):
            self.act_depth -= 1
            if not self.act_depth and self.scopes:
                layouts = self._inputs[path]
                layout = layouts.pop() if layouts else None
                self.record(path, target, site, output, module_layout(module) or layout)

        return hook

    def record(self, path: str, target: str, site: bool, out, layout: str | None = None) -> None:
        self.seq += 1
        scope, inv = self.scopes[-1]
        shape = dtype = None
        if isinstance(out, torch.Tensor):
            shape, dtype = tuple(int(s) for s in out.shape), out.dtype
        tag = _tag(out) or "real"
        self.calls.append(Call(path, target, scope, inv, self.seq, tag, site, shape, dtype, layout))

    def __enter__(self) -> Observer:
        acts = {**{p: (m, True) for p, m in self.targets.items()},
                **{p: (m, False) for p, m in self.others.items()}}  # fmt: skip
        act_ids = {id(m) for m, _ in acts.values()}
        for path, scope in self.scope_modules.items():
            self._handles.append(scope.register_forward_pre_hook(self._scope_pre(path)))
            self._handles.append(scope.register_forward_hook(self._scope_post, always_call=True))
            for sub, mod in scope.named_modules(prefix=path):
                if id(mod) in act_ids:
                    continue
                has_params = any(True for _ in mod.parameters(recurse=False))
                layout = module_layout(mod)
                self._handles.append(
                    mod.register_forward_pre_hook(self._module_pre(sub, has_params))
                )
                self._handles.append(
                    mod.register_forward_hook(self._module_post(layout), always_call=True)
                )
        for path, (mod, site) in acts.items():
            target = _describe(type(mod))
            self._handles.append(mod.register_forward_pre_hook(self._act_pre(path)))
            self._handles.append(
                mod.register_forward_hook(self._act_post(path, site, target), always_call=True)
            )
        return self

    def __exit__(self, *exc) -> None:
        self._functions_off()
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def reset(self) -> None:
        """Forget what was seen (before another attempt of the run)."""
        self.calls.clear()
        self.scopes.clear()
        self._functions_off()
        self.stack.clear()
        self.act_depth = 0

    def final_calls(self) -> list[Call]:
        """The calls of the last attempt (meta, fake and real attempts tag their tensors)."""
        if not self.calls:
            return []
        tag = self.calls[-1].tag
        return [c for c in self.calls if c.tag == tag]

    def is_last_in_scope(self, call: Call) -> bool:
        """No parametrised module ran after ``call`` in the same call of its scope."""
        return self.last_param.get(call.inv, 0) < call.seq


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
            Site(
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


def insert_module_site(
    root: nn.Module, site: Site, shift: str, scale: str, fused: bool, device
) -> str:
    """Attach ``ShiftScale`` after the activation module ``site.name``; return its path."""
    module = root.get_submodule(site.name)
    ss = ShiftScale(shift, scale, site.feature_shape, site.channel_dim, fused=fused).to(device)
    return f"{site.name}.{attach_after(module, ss)}"


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
    gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], user_leaves: Sequence[type]
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
    free_nodes = reaches_output_freely(gm)
    free = {p for p in scopes if all(n in free_nodes for n in graph_targets[p])}
    free |= {n.name for n in functions if n in free_nodes}
    found = collect(obs, kinds, free, lambda call: reasons[call.scope](call))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for s in found.sites:
        s.extra["position"] = order[graph_targets[s.extra["scope"]][0]]
    return found


def graph_leftovers(gm: fx.GraphModule, sites: Sequence[Site]) -> tuple[list[dict], list[dict]]:
    """Activation nodes of the graph that are not sites: ``(finals, unreached)``."""
    names = {s.name for s in sites}
    free = reaches_output_freely(gm)
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
