"""Tracing any nn.Module with torch.fx, the way timm's feature extraction does."""

from __future__ import annotations

import copy
import os
import traceback
from collections.abc import Iterable, Sequence

import torch
from torch import fx, nn

from . import registry
from .errors import TraceError

_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.dirname(m.__file__)) for m in (torch,) if getattr(m, "__file__", None)
)


def _timm_fx() -> tuple[list[type], list]:
    try:
        import timm  # noqa: F401  (importing timm's models registers their leaves)
        from timm.layers import _fx
    except ImportError:
        return [], []
    fns = [f for f in _fx.get_notrace_functions() if callable(f)]
    return list(_fx.get_notrace_modules()), fns


def _torchvision_ops() -> None:
    try:  # importing the ops registers their torch.fx.wrap'ed functions (e.g. stochastic_depth)
        import torchvision.ops  # noqa: F401
    except ImportError:
        pass


class SurgeonTracer(fx.Tracer):
    """An FX tracer whose leaves are torch.nn modules, timm's registered leaves,
    registered activation and norm-act classes, and any extra classes the user names."""

    def __init__(self, leaf_modules: Iterable[type] = ()) -> None:
        timm_leaves, timm_fns = _timm_fx()
        _torchvision_ops()
        super().__init__(autowrap_functions=tuple(timm_fns))
        self.leaf_types = tuple(set(timm_leaves) | registry.LEAF_MODULES | set(leaf_modules))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        from .layers import ShiftScale

        if isinstance(m, (ShiftScale, *self.leaf_types)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


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
    """``file:line`` of the innermost traceback frame outside torch (the user's own code)."""
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        fn = fr.filename
        if fn.startswith(_LIBRARY_DIRS) or "/surgeon/" in fn or fn.startswith("<"):
            continue
        return f"{fn}:{fr.lineno}"
    return None


def trace(
    model: nn.Module, leaf_modules: Iterable[type] = (), copy_model: bool = True
) -> fx.GraphModule:
    """Symbolically trace ``model`` (a deep copy unless ``copy_model=False``)."""
    if isinstance(model, fx.GraphModule):
        root = copy.deepcopy(model) if copy_model else model
        return fx.GraphModule(
            root, copy.deepcopy(root.graph) if copy_model else root.graph, type(root).__name__
        )
    root = copy.deepcopy(model) if copy_model else model
    tracer = SurgeonTracer(leaf_modules)
    try:
        graph = tracer.trace(root)
    except Exception as exc:  # the tracer raises many types; all mean "not traceable"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = _user_frame(exc)
        loc = f" at {where}" if where else ""
        raise TraceError(
            f"cannot trace {type(model).__name__} with torch.fx{loc}: {reason}",
            hint="mark the module that does data-dependent control flow as a leaf with --leaf ClassName",
        ) from exc
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.train(model.training)
    gm.surgeon_mode_dependent = _mode_dependent(root, graph, leaf_modules)
    return gm


def _mode_dependent(root: nn.Module, graph: fx.Graph, leaf_modules: Iterable[type]) -> bool:
    """True if tracing in the other train/eval mode gives another graph: Python code that
    branches on ``self.training`` outside leaf modules, which FX bakes in at trace time."""
    mode = root.training
    root.train(not mode)
    try:
        other = SurgeonTracer(leaf_modules).trace(root)
    except Exception:
        return True
    finally:
        root.train(mode)
    return other.python_code("self").src != graph.python_code("self").src
