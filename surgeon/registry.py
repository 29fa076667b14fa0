"""Registries of what the graph pass recognises: activation modules, functions and Tensor
methods (each with a kind: ``activation``, ``softmax``, a gate candidate), fused norm+act
modules and leaf modules. Users extend them with :func:`register_activation`,
:func:`register_norm_act` and :func:`register_leaf_module`; a module no table names counts
if it applies exactly one activation (:func:`behaves_like_activation`). timm's and
torchvision's classes join the tables once those libraries are imported. See docs/design.md.
"""

from __future__ import annotations

import operator
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SurgeryError

KINDS = ("input", "activation", "gate", "softmax", "norm_act")


@dataclass(frozen=True)
class ActivationEntry:
    kind: str
    gate_candidate: bool = False  # sigmoid-like: reported as "gate" when it multiplies features


_ACT_MODULES: dict[type, ActivationEntry] = {}
ACT_FUNCTIONS: dict[Callable, ActivationEntry] = {}
ACT_METHODS: dict[str, ActivationEntry] = {}
# Modules whose output is an activation's output only when a condition on the instance holds
# (e.g. timm's BatchNormAct2d with apply_act=True); the predicate gets the module.
_NORM_ACT_MODULES: dict[type, Callable[[nn.Module], bool]] = {}
_LEAF_MODULES: set[type] = set()
# timm's leaf modules that fx-surgeon traces into anyway, by qualified name, each with the
# reason timm's own reason for the leaf does not apply here.
TRACE_THROUGH: dict[str, str] = {
    "timm.models.nfnet.NormFreeBlock": (
        "timm: FX dead-code elimination drops `out.mul_(gain)`; fx-surgeon never eliminates "
        "dead code, and the block holds all of NFNet's activations"
    ),
}


def register_activation(
    obj: type | Callable | str, kind: str = "activation", gate_candidate: bool = False
) -> None:
    """Register an activation: a module class, a function, or a Tensor method name."""
    if kind not in KINDS or kind in ("input", "norm_act"):
        raise SurgeryError(
            f"invalid activation kind {kind!r}", hint="use activation, gate or softmax"
        )
    entry = ActivationEntry(kind, gate_candidate)
    if isinstance(obj, str):
        ACT_METHODS[obj] = entry
    elif isinstance(obj, type) and issubclass(obj, nn.Module):
        _ACT_MODULES[obj] = entry
        _LEAF_MODULES.add(obj)
    elif callable(obj):
        ACT_FUNCTIONS[obj] = entry
    else:
        raise SurgeryError(
            f"cannot register {obj!r} as an activation",
            hint="pass a class, function or method name",
        )


def register_norm_act(cls: type, applies_act: Callable[[nn.Module], bool] | None = None) -> None:
    """Register a fused norm+activation leaf module whose output is the activation output."""
    _NORM_ACT_MODULES[cls] = applies_act or _has_real_act
    _LEAF_MODULES.add(cls)


def register_leaf_module(cls: type) -> type:
    """Make the tracer treat ``cls`` as one opaque node (usable as a decorator)."""
    _LEAF_MODULES.add(cls)
    return cls


def _has_real_act(module: nn.Module) -> bool:
    act = getattr(module, "act", None)
    return act is not None and not isinstance(act, nn.Identity)


def _register_torch() -> None:
    for cls in (
        nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
        nn.SiLU, nn.Mish, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Softplus, nn.Softsign,
        nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.GLU,
    ):  # fmt: skip
        register_activation(cls)
    for cls in (nn.Sigmoid, nn.Hardsigmoid):
        register_activation(cls, "activation", gate_candidate=True)
    for cls in (nn.Softmax, nn.LogSoftmax, nn.Softmax2d, nn.Softmin):
        register_activation(cls, "softmax")
    for fn in (
        F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.leaky_relu_, F.elu,
        F.elu_, F.selu, F.selu_, torch.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
        F.tanh, torch.tanh, F.hardtanh, F.hardtanh_, F.softplus, F.softsign, F.prelu,
        torch.prelu, F.rrelu, F.logsigmoid, F.glu, F.tanhshrink, F.threshold,
    ):  # fmt: skip
        register_activation(fn)
    for fn in (F.sigmoid, torch.sigmoid, F.hardsigmoid):
        register_activation(fn, gate_candidate=True)
    for fn in (F.softmax, torch.softmax, F.log_softmax, torch.log_softmax, F.softmin):
        register_activation(fn, "softmax")
    for name in ("relu", "relu_", "tanh", "tanh_"):
        register_activation(name)
    for name in ("sigmoid", "sigmoid_"):
        register_activation(name, gate_candidate=True)
    for name in ("softmax", "log_softmax"):
        register_activation(name, "softmax")


_timm_registered = False


def _register_timm() -> None:
    """Register timm's activation and norm+act classes once timm has been imported."""
    global _timm_registered
    if _timm_registered or "timm" not in sys.modules:
        return
    _timm_registered = True
    try:
        from timm.layers import activations, norm_act
    except ImportError:  # a broken timm install: the torch tables still work
        return
    modules = [activations]
    try:
        from timm.layers import activations_me

        modules.append(activations_me)
    except ImportError:
        pass
    for mod in modules:
        for name in dir(mod):
            obj = getattr(mod, name)
            if (
                not (isinstance(obj, type) and issubclass(obj, nn.Module))
                or obj.__module__ != mod.__name__
            ):
                continue
            gate = "sigmoid" in name.lower()
            register_activation(obj, "activation", gate_candidate=gate)
    for name in dir(norm_act):
        obj = getattr(norm_act, name)
        if isinstance(obj, type) and issubclass(obj, nn.Module) and "Act" in name:
            register_norm_act(obj)

    # Modules that branch on ``self.training`` in Python: traced through, FX would bake the
    # trace-time mode into the graph; as leaves they keep deciding at run time.
    try:
        from timm.layers import DropBlock2d, DropPath

        _LEAF_MODULES.update({DropPath, DropBlock2d})  # reason: drop_path(x, p, self.training)
    except ImportError:
        pass


_torchvision_registered = False


def _register_torchvision() -> None:
    global _torchvision_registered
    if _torchvision_registered or "torchvision" not in sys.modules:
        return
    _torchvision_registered = True
    try:
        from torchvision.ops import StochasticDepth
    except ImportError:
        return
    _LEAF_MODULES.add(StochasticDepth)  # reason: stochastic_depth(..., self.training)


_register_torch()


def sync() -> None:
    """Add the classes of timm and torchvision to the tables once they are imported."""
    _register_timm()
    _register_torchvision()


def leaf_modules() -> set[type]:
    """Every registered leaf module class (activations included)."""
    sync()
    return _LEAF_MODULES


def __getattr__(name: str):
    """``ACT_MODULES``, ``NORM_ACT_MODULES`` and ``LEAF_MODULES``, complete with timm's and
    torchvision's classes once those are imported."""
    if name in ("ACT_MODULES", "NORM_ACT_MODULES", "LEAF_MODULES"):
        sync()
        return globals()[f"_{name}"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def lookup_module(module: nn.Module) -> tuple[str, bool] | None:
    """``(kind, gate_candidate)`` if ``module`` is a registered activation, or a module that
    behaves as one (:func:`behaves_like_activation`), else None."""
    sync()
    for cls in type(module).__mro__:
        if cls in _ACT_MODULES:
            e = _ACT_MODULES[cls]
            return e.kind, e.gate_candidate
        if cls in _NORM_ACT_MODULES:
            return ("norm_act", False) if _NORM_ACT_MODULES[cls](module) else None
    return behaves_like_activation(module)


_ARITHMETIC_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div,
}  # fmt: skip
_ARITHMETIC_METHODS = {"add", "sub", "mul", "div", "neg"}
_BEHAVIOUR: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def behaves_like_activation(module: nn.Module) -> tuple[str, bool] | None:
    """``(kind, gate_candidate)`` for a module no table names whose forward applies exactly
    one registered activation to its input (transformers' ``GELUActivation``, a user's
    ``MySwish``), seen by tracing the module alone; else None. Modules with parameters or
    children, and torch.nn's own, never count. Cached per module."""
    if module in _BEHAVIOUR:
        return _BEHAVIOUR[module]
    hit = None
    cls = type(module)
    own = not cls.__module__.startswith("torch.")
    if (
        own
        and not any(True for _ in module.parameters())
        and not any(True for _ in module.children())
    ):
        hit = _traced_activation(module)
    _BEHAVIOUR[module] = hit
    return hit


def _traced_activation(module: nn.Module) -> tuple[str, bool] | None:
    import warnings

    from torch import fx

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = fx.Tracer().trace(module)
    except Exception:  # not traceable alone: not recognised by behaviour
        return None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    calls = [n for n in graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    if len(placeholders) < 1 or any(n.op == "call_module" for n in calls):
        return None
    acts, other = [], []
    for n in calls:
        entry = (ACT_FUNCTIONS if n.op == "call_function" else ACT_METHODS).get(n.target)
        (acts if entry is not None else other).append((n, entry))
    arithmetic = all(
        n.target in (_ARITHMETIC_FUNCTIONS if n.op == "call_function" else _ARITHMETIC_METHODS)
        for n, _ in other
    )
    if len(acts) != 1 or not arithmetic:
        return None
    entry = acts[0][1]
    return entry.kind, entry.gate_candidate and not other  # x * sigmoid(k * x) is not a gate
