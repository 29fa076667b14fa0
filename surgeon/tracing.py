"""Tracing any nn.Module with torch.fx, the way timm's feature extraction does.

The plain path: :class:`SurgeonTracer` (torch.nn, timm's and the registry's leaves), the
model traced in its own mode and again in the other one (``if self.training:`` is baked
into a graph), the two graphs compared; ``F.dropout(x, p, training=...)`` calls whose flag
is the only difference become ``nn.Dropout`` modules, any other difference marks the graph
mode-dependent (``gm.surgeon_mode_dependent``). ``surgeon._fx_fast`` does the same faster
where this torch allows it (docs/design.md, "tracer").
"""

from __future__ import annotations

import copy
import inspect
import os
import re
import sys
import traceback
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.node import map_arg

from . import _fx_fast, example_tracing, registry
from ._fx_fast import watch_training  # noqa: F401  (tests and benchmarks reach it here)
from .errors import TraceError
from .layers import ShiftScale

try:  # attributes listed here survive copy.deepcopy of a GraphModule
    from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY
except ImportError:  # pragma: no cover - older torch
    _USER_PRESERVED_ATTRIBUTES_KEY = "_user_preserved_attributes"


def set_preserved(gm: fx.GraphModule, name: str, value: Any) -> None:
    """``setattr(gm, name, value)`` in a way that survives ``copy.deepcopy(gm)``.

    ``GraphModule.__deepcopy__`` rebuilds the module from its graph and drops unknown
    attributes; those registered in ``gm.meta`` under torch's preserved-attributes key
    are put back.
    """
    setattr(gm, name, value)
    gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})[name] = value


def deepcopy_module(module: nn.Module) -> nn.Module:
    """``copy.deepcopy(module)``: the copy that keeps the caller's model untouched."""
    return copy.deepcopy(module)


def _package_dirs() -> tuple[str, ...]:
    here = os.path.dirname(os.path.abspath(__file__))  # fx-surgeon itself
    dirs = [os.path.dirname(torch.__file__), here]
    for name in ("timm", "torchvision"):
        try:
            dirs.append(os.path.dirname(__import__(name).__file__))
        except ImportError:
            pass
    return tuple(os.path.join(d, "") for d in dirs)


def _not_users(filename: str, skip: tuple[str, ...], stdlib: str | None = None) -> bool:
    """True for a frame of torch, timm, torchvision, fx-surgeon or the standard library.
    The standard library's folder can hold site-packages (pyenv, a system Python):
    a package installed there is not the standard library."""
    if filename.startswith("<"):
        return True
    path = os.path.abspath(filename)
    if path.startswith(skip):
        return True
    stdlib = os.path.join(os.path.dirname(os.__file__), "") if stdlib is None else stdlib
    return path.startswith(stdlib) and _library_of(path) is None


def _timm_fx() -> tuple[list[type], list]:
    """timm's leaves and autowrapped functions, once timm is imported (a model that holds
    timm modules has imported it; importing it for any other model costs seconds)."""
    if "timm" not in sys.modules:
        return [], []
    try:
        import timm  # noqa: F401  (importing timm's models registers their leaves)
        from timm.layers import _fx
    except ImportError:
        return [], []
    fns = [f for f in _fx.get_notrace_functions() if callable(f)]
    leaves = [
        m
        for m in _fx.get_notrace_modules()
        if f"{m.__module__}.{m.__qualname__}" not in registry.TRACE_THROUGH
    ]
    return leaves, fns


def _torchvision_ops() -> None:
    if "torchvision" not in sys.modules:  # a model using its ops has imported torchvision
        return
    try:  # importing the ops registers their torch.fx.wrap'ed functions (e.g. stochastic_depth)
        import torchvision.ops  # noqa: F401
    except ImportError:
        pass


class SurgeonTracer(fx.Tracer):
    """An FX tracer whose leaves are torch.nn modules, timm's registered leaves,
    registered activation and norm-act classes, and any extra classes the user names."""

    def __init__(self, leaf_modules: Iterable[type] = (), **kwargs: Any) -> None:
        timm_leaves, timm_fns = _timm_fx()
        _torchvision_ops()
        super().__init__(autowrap_functions=tuple(timm_fns), **kwargs)
        self.leaf_types = tuple(set(timm_leaves) | registry.LEAF_MODULES | set(leaf_modules))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (ShiftScale, *self.leaf_types)):
            return True
        if registry.behaves_like_activation(m) is not None:  # one node, like nn.GELU
            return True
        return super().is_leaf_module(m, module_qualified_name)


class _FastTracer(_fx_fast.FastTracing, _fx_fast.Replaying, SurgeonTracer):
    """:class:`SurgeonTracer` with the fast path's tracer and replays."""


class _ReplayingTracer(_fx_fast.Replaying, SurgeonTracer):
    """:class:`SurgeonTracer` with the fast path's replays only."""


def _tracer(leaf_modules: Iterable[type], reads: Any = None) -> SurgeonTracer:
    """The tracer the fast path allows: with ``reads``, one that replays."""
    fast = _fx_fast.on("tracer")
    if reads is not None:
        return (_FastTracer if fast else _ReplayingTracer)(leaf_modules, reads=reads)
    return _FastTracer(leaf_modules) if fast else SurgeonTracer(leaf_modules)


def resolve_leaf_names(model: nn.Module, names: Sequence[str]) -> list[type]:
    """Map class names (``Block`` or ``pkg.mod.Block``) to the classes used in ``model``."""
    found: list[type] = []
    classes = {type(m) for m in model.modules()}
    for name in names:
        matches = [c for c in classes if name in (c.__name__, f"{c.__module__}.{c.__qualname__}")]
        if not matches:
            known = sorted({c.__name__ for c in classes})
            raise TraceError(
                f"--leaf {name!r}: no module of that class in the model",
                hint=f"use a class name that appears in the model, e.g. {', '.join(known[:8])}",
            )
        found.extend(matches)
    return found


def _user_frame(exc: BaseException) -> str | None:
    """``file:line`` of the innermost traceback frame outside torch, timm, torchvision,
    fx-surgeon and the standard library: the user's own code."""
    skip = _package_dirs()
    for fr in reversed(traceback.extract_tb(exc.__traceback__)):
        if not _not_users(fr.filename, skip):
            return f"{fr.filename}:{fr.lineno}"
    return None


def _trace_graph(
    root: nn.Module, leaf_modules: Iterable[type], concrete: dict[str, Any] | None = None
) -> fx.Graph:
    return _tracer(leaf_modules).trace(root, concrete_args=concrete or None)


def constant_defaults(root: nn.Module, n_inputs: int) -> dict[str, Any]:
    """The arguments of ``root.forward`` past the first ``n_inputs`` whose default is None, a
    bool, a number or a string: a call with ``n_inputs`` tensors leaves them at that value.

    The graph takes them as constants (FX asserts the value at run time), so that
    ``if mask is not None or is_causal:`` follows the call the model gets instead of failing
    on, or branching on, a proxy (timm's ``Hiera.forward``, ``VisionTransformer.forward``).
    """
    try:
        params = list(inspect.signature(root.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {
        p.name: p.default
        for i, p in enumerate(params)
        if i >= n_inputs
        and p.kind in kinds
        and (p.default is None or type(p.default) in (bool, int, float, str))
    }


def graph_module(
    root: nn.Module, graph: fx.Graph, name: str, compile: bool = True
) -> fx.GraphModule:
    """``fx.GraphModule(root, graph, name)``; with ``compile=False`` the fast path may
    generate its Python code on the first call instead (for a graph that will change
    before it runs)."""
    if not compile and _fx_fast.on("codegen"):
        gm = _fx_fast.lazy_graph_module(root, graph, name)
        if gm is not None:
            return gm
    return fx.GraphModule(root, graph, name)


def trace(
    model: nn.Module,
    leaf_modules: Iterable[type] = (),
    copy_model: bool = True,
    n_inputs: int = 1,
    compile: bool = True,
    example_inputs: Sequence[torch.Tensor] | None = None,
) -> fx.GraphModule:
    """Symbolically trace ``model`` (a deep copy unless ``copy_model=False``) in its
    current train/eval mode, for calls with ``n_inputs`` positional tensors. With
    ``compile=False`` the code is generated on the first call (see :func:`graph_module`).

    Where the plain trace fails and ``example_inputs`` are given, the model is traced again
    with an example call alongside (:mod:`surgeon.example_tracing`): shape and dtype checks
    take the example's answer. The graph says so in ``surgeon_traced_with``."""
    leaf_modules = tuple(leaf_modules)
    if isinstance(model, fx.GraphModule):
        root = copy.deepcopy(model) if copy_model else model
        gm = fx.GraphModule(
            root, copy.deepcopy(root.graph) if copy_model else root.graph, type(root).__name__
        )
        gm.train(model.training)
        set_preserved(gm, "surgeon_mode_dependent", getattr(model, "surgeon_mode_dependent", False))
        return gm
    root = deepcopy_module(model) if copy_model else model
    concrete = constant_defaults(root, n_inputs) or None
    try:
        if _fx_fast.on("replays"):
            graph, dependent, dropouts = _trace_with_replays(root, leaf_modules, concrete)
        else:
            graph = _trace_graph(root, leaf_modules, concrete)
            other = _trace_in_other_mode(root, leaf_modules, concrete)
            dependent, dropouts = _compare_graphs(graph, other, trained=root.training)
        traced_with = None
    except Exception as exc:  # the tracer raises many types; all mean "not traceable"
        if not example_inputs:
            raise _trace_error(model, exc) from exc
        try:
            graph, dependent, dropouts, traced_with = _trace_with_example(
                root, leaf_modules, example_inputs
            )
        except Exception as again:
            raise _trace_error(model, again) from again
    gm = graph_module(root, graph, type(model).__name__, compile)
    _dropouts_to_modules(gm, dropouts)
    if dropouts and compile:
        gm.recompile()
    gm.train(model.training)
    set_preserved(gm, "surgeon_mode_dependent", dependent)
    if traced_with is not None:
        set_preserved(gm, "surgeon_traced_with", traced_with)
    return gm


class _ExampleTracer(example_tracing.ExampleTracing, SurgeonTracer):
    """:class:`SurgeonTracer` that traces with an example call (no fast path)."""


def _trace_with_example(
    root: nn.Module, leaf_modules: Sequence[type], inputs: Sequence[torch.Tensor]
) -> tuple[fx.Graph, bool, dict, dict[str, Any]]:
    """Trace ``root`` with the example ``inputs`` in its mode and in the other one:
    ``(graph, mode_dependent, dropouts, traced_with)``. The example calls leave the model
    as they found it (batch-norm statistics, the RNG that dropout draws from)."""
    buffers = [b.detach().clone() for b in root.buffers()]
    rng = torch.get_rng_state()
    mode = root.training
    try:
        tracer = _ExampleTracer(leaf_modules)
        graph = tracer.trace_example(root, inputs)
        root.train(not mode)
        try:
            other = _ExampleTracer(leaf_modules).trace_example(root, inputs)
        except Exception:  # traceable in one mode only: keep to that mode
            other = None
    finally:
        root.train(mode)
        with torch.no_grad():
            for b, saved in zip(root.buffers(), buffers, strict=True):
                b.copy_(saved)
        torch.set_rng_state(rng)
    dependent, dropouts = _compare_graphs(graph, other, trained=mode)
    traced_with = {"example_inputs": [list(x.shape) for x in inputs], "decisions": tracer.decisions}
    return graph, dependent, dropouts, traced_with


def _trace_with_replays(
    root: nn.Module, leaf_modules: tuple[type, ...], concrete: dict[str, Any] | None
) -> tuple[fx.Graph, bool, dict[fx.Node, dict[str, Any]]]:
    """One trace that records reads of ``training``; module calls that read it are traced
    again alone, in the other mode (``_fx_fast.Replaying``). Reads no module call could
    answer (the root's own forward, a module that reads another's flag, an unwatchable
    class) need the whole model traced again in the other mode."""
    with _fx_fast.watch_training(root) as reads:
        tracer = _tracer(leaf_modules, reads)
        graph = tracer.trace(root, concrete_args=concrete)
    well_formed = _well_formed(graph)
    if reads.whole or reads.modules or reads.unwatched or not well_formed:
        if not well_formed:  # pragma: no cover - a replay left a dangling node
            graph = _trace_graph(root, leaf_modules, concrete)
        other = _trace_in_other_mode(root, leaf_modules, concrete)
        return graph, *_compare_graphs(graph, other, trained=root.training)
    dependent, dropouts = tracer.replays.failed, {}
    for mine, theirs in tracer.replays.pairs:
        differs, found = _compare(mine, theirs, tracer.traced_training)
        dependent |= differs
        dropouts.update(found)
    return graph, dependent, dropouts


def _library_of(filename: str) -> str | None:
    """The installed package a file belongs to (``transformers``), or None for the user's
    own code."""
    parts = os.path.abspath(filename).split(os.sep)
    for marker in ("site-packages", "dist-packages"):
        if marker in parts[:-1]:
            return parts[parts.index(marker) + 1].removesuffix(".py")
    return None


def _trace_error(model: nn.Module, exc: BaseException) -> TraceError:
    text = str(exc).strip()
    reason = text.splitlines()[0] if text else type(exc).__name__
    where = _user_frame(exc)
    library = _library_of(where.rpartition(":")[0]) if where else None
    if library is None:
        loc = f" at {where}" if where else ""
        return TraceError(
            f"cannot trace {type(model).__name__} with torch.fx{loc}: {reason}",
            hint="mark the module that does data-dependent control flow as a leaf with --leaf ClassName, or insert at module level with --fallback auto",
        )
    skip = _package_dirs()
    own = [
        f"{fr.filename}:{fr.lineno}"
        for fr in traceback.extract_tb(exc.__traceback__)
        if not _not_users(fr.filename, skip) and _library_of(fr.filename) is None
    ]
    via = f" (reached from {own[-1]})" if own else ""
    return TraceError(
        f"cannot trace {type(model).__name__} with torch.fx: inside {library} at {where}{via}: "
        f"{reason}",
        hint=f"the failure is in the code of {library}, not yours: --fallback auto inserts after "
        f"its activation modules instead, or mark the {library} module that fails as a leaf "
        "with --leaf ClassName",
    )


def _trace_in_other_mode(
    root: nn.Module, leaf_modules: Iterable[type], concrete: dict[str, Any] | None = None
) -> fx.Graph | None:
    mode = root.training
    root.train(not mode)
    try:
        return _trace_graph(root, leaf_modules, concrete)
    except Exception:
        return None
    finally:
        root.train(mode)


# ---------------------------------------------------------------- mode dependence


_DROPOUT_MODULES: dict[Any, type[nn.Module]] = {
    F.dropout: nn.Dropout, F.dropout1d: nn.Dropout1d, F.dropout2d: nn.Dropout2d,
    F.dropout3d: nn.Dropout3d, F.alpha_dropout: nn.AlphaDropout,
    F.feature_alpha_dropout: nn.FeatureAlphaDropout,
}  # fmt: skip
_CONSTANT = re.compile(r"_tensor_constant\d+")


def _target_key(node: fx.Node) -> Any:
    if node.op == "get_attr":
        return _CONSTANT.sub("_tensor_constant", node.target)
    return node.target


def _dropout_args(node: fx.Node) -> dict[str, Any] | None:
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _compare(
    mine: list[fx.Node], theirs: list[fx.Node], trained: bool
) -> tuple[bool, dict[fx.Node, dict[str, Any]]]:
    """Compare the nodes of one trace in ``trained`` mode with those of the other mode:
    whether they still differ once ``F.dropout(..., training=self.training)`` calls are
    set aside, and those calls (node -> bound arguments). Attribute reads are compared by
    name (a replay reuses the parameter reads already made); references to nodes outside
    the lists, by identity."""
    mine = [n for n in mine if n.op != "get_attr"]
    theirs = [n for n in theirs if n.op != "get_attr"]
    if len(mine) != len(theirs):
        return True, {}
    pos_a = {n: i for i, n in enumerate(mine)}
    pos_b = {n: i for i, n in enumerate(theirs)}

    def key(value: Any, pos: dict[fx.Node, int]) -> str:
        def ref(n: fx.Node) -> str:
            if n.op == "get_attr":
                return f"@{_target_key(n)}"
            return f"%{pos[n]}" if n in pos else f"^{id(n)}"

        return repr(map_arg(value, ref))

    dropouts: dict[fx.Node, dict[str, Any]] = {}
    for a, b in zip(mine, theirs, strict=True):
        if a.op != b.op or _target_key(a) != _target_key(b):
            return True, {}
        if key((a.args, a.kwargs), pos_a) == key((b.args, b.kwargs), pos_b):
            continue
        if a.op != "call_function" or a.target not in _DROPOUT_MODULES:
            return True, {}
        args_a, args_b = _dropout_args(a), _dropout_args(b)
        if args_a is None or args_b is None:
            return True, {}
        rest_a = {k: v for k, v in args_a.items() if k != "training"}
        rest_b = {k: v for k, v in args_b.items() if k != "training"}
        if key(rest_a, pos_a) != key(rest_b, pos_b):
            return True, {}
        if args_a["training"] is not trained or args_b["training"] is trained:
            return True, {}  # not training=self.training
        dropouts[a] = args_a
    return False, dropouts


def _compare_graphs(
    graph: fx.Graph, other: fx.Graph | None, trained: bool
) -> tuple[bool, dict[fx.Node, dict[str, Any]]]:
    """:func:`_compare` for two whole graphs; no other graph (it did not trace): dependent."""
    if other is None:
        return True, {}
    return _compare(list(graph.nodes), list(other.nodes), trained)


def _well_formed(graph: fx.Graph) -> bool:
    """Every node's inputs are nodes of the graph (a replay's scratch nodes never leak)."""
    return all(inp.graph is graph for n in graph.nodes for inp in n.all_input_nodes)


def _dropouts_to_modules(gm: fx.GraphModule, dropouts: dict[fx.Node, dict[str, Any]]) -> None:
    """Turn ``F.dropout(..., training=<baked>)`` nodes into ``nn.Dropout`` modules, which
    read ``self.training`` when they run."""
    for node, args in dropouts.items():
        name, i = f"{node.name}_mod", 1
        while hasattr(gm, name):
            name, i = f"{node.name}_mod_{i}", i + 1
        cls = _DROPOUT_MODULES[node.target]
        gm.add_submodule(name, cls(p=float(args["p"]), inplace=bool(args["inplace"])))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (args["input"],))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    if dropouts:
        gm.graph.lint()
