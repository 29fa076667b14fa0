"""Finding the insertion sites of a traced model.

A site is a node whose output gets a shift/scale module: every floating-point tensor input,
and every activation node (module, function or method form; fused norm+activation leaves
too) except *final* ones, whose value reaches the model output without passing through a
parametrised layer. Sigmoid-like activations whose output multiplies other features are
*gates* (squeeze-excite); ``x * sigmoid(x)`` written out by hand is one activation whose
site is the product.
"""

from __future__ import annotations

import fnmatch
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import registry
from .attach import attach_after, attach_before, free_name, insert_after
from .errors import SurgeryError
from .shapes import node_dtype, node_shape


@dataclass
class Site:
    """One insertion point: the output of node (or module) ``name``.

    A site found in a model knows how to take its shift/scale module (:meth:`attach`); one
    read back from a record (:meth:`from_dict`) is a plain description.
    """

    index: int
    name: str
    kind: str
    target: str
    shape: tuple[int, ...]  # -1 for the batch
    channel_dim: int
    module: str = ""  # name of the inserted module, once inserted
    extra: dict = field(default_factory=dict)
    folded_into: list[str] | None = None  # set by surgeon.fold
    scale_folded_into: list[str] | None = None

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[1:])

    def attach(self, root: nn.Module, layer: nn.Module) -> str:
        """Put ``layer`` after the site in ``root``; return its module path."""
        raise SurgeryError(
            f"site {self.name!r} is a description read from a record",
            hint="insert into the model with surgeon.insert()",
        )

    def to_dict(self) -> dict:
        d = {
            "index": self.index, "name": self.name, "kind": self.kind, "target": self.target,
            "shape": list(self.shape), "channel_dim": self.channel_dim, "module": self.module,
        }  # fmt: skip
        if self.extra:
            d["extra"] = dict(self.extra)
        for key in ("folded_into", "scale_folded_into"):
            if getattr(self, key) is not None:
                d[key] = list(getattr(self, key))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Site:
        d = dict(d)
        d["shape"] = tuple(d["shape"])
        d["extra"] = dict(d.get("extra") or {})
        return cls(**{k: v for k, v in d.items() if k in _RECORDED})

    def description(self) -> Site:
        """A plain :class:`Site` with the same fields (what a record keeps)."""
        return Site.from_dict(self.to_dict())


_RECORDED = {f for f in Site.__dataclass_fields__}
SS_PREFIX = "ss_"


@dataclass
class GraphSite(Site):
    """The output of a node of the traced graph: a ``call_module`` node after it."""

    node: fx.Node | None = field(default=None, repr=False, compare=False)

    def attach(self, root: nn.Module, layer: nn.Module) -> str:
        name = free_name(root, SS_PREFIX + self.name)
        insert_after(root, self.node, name, layer)
        return name


@dataclass
class ModuleSite(Site):
    """The output of an activation module the graph does not reach (inside a leaf, or in a
    model FX cannot trace): a child of that module, applied by a forward hook."""

    def attach(self, root: nn.Module, layer: nn.Module) -> str:
        return f"{self.name}.{attach_after(root.get_submodule(self.name), layer)}"


@dataclass
class InputSite(Site):
    """The first input of a model without a graph: a child of the model, applied by a
    forward pre-hook. ``name`` is the forward's parameter."""

    def attach(self, root: nn.Module, layer: nn.Module) -> str:
        return attach_before(root, layer, self.name)


_MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
_MUL_METHODS = {"mul", "mul_"}


def _is_mul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _MUL_FUNCTIONS) or (
        node.op == "call_method" and node.target in _MUL_METHODS
    )


def describe(obj) -> str:
    """How a site's target reads in tables: ``nn.ReLU``, ``F.gelu``, ``Tensor.relu``, ..."""
    if isinstance(obj, str):
        return f"Tensor.{obj}"
    if isinstance(obj, type):
        mod = obj.__module__
        if mod.startswith("torch.nn"):
            return f"nn.{obj.__name__}"
        return f"{mod.split('.')[0]}.{obj.__name__}"
    mod = getattr(obj, "__module__", None) or ""
    name = getattr(obj, "__name__", str(obj))
    if getattr(torch, name, None) is obj:
        return f"torch.{name}"
    if getattr(F, name, None) is obj:  # F.gelu lives in torch._C._nn
        return f"F.{name}"
    if mod.startswith("torch.nn.functional"):
        return f"F.{name}"
    if mod.startswith("torch") or mod == "":
        return f"torch.{name}"
    return f"{mod.split('.')[0]}.{name}"


def classify(node: fx.Node, gm: fx.GraphModule) -> tuple[str, str, bool] | None:
    """``(kind, target, gate_candidate)`` for an activation node, else None."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        hit = registry.lookup_module(mod)
        return (hit[0], describe(type(mod)), hit[1]) if hit else None
    if node.op == "call_function":
        entry = registry.ACT_FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        entry = registry.ACT_METHODS.get(node.target)
    else:
        return None
    return (entry.kind, describe(node.target), entry.gate_candidate) if entry else None


# ---------------------------------------------------------------- parametrised paths


def _is_parametrised(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return any(True for _ in gm.get_submodule(node.target).parameters())
    if node.op in ("call_function", "call_method"):
        for a in node.all_input_nodes:
            if a.op == "get_attr" and isinstance(_fetch_attr(gm, a.target), nn.Parameter):
                return True
    return False


def _fetch_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


FINAL_RULES = ("parametrised", "output")
"""When an activation is *final* (no site): ``parametrised`` (the default) when its value
reaches the model output through no parametrised layer; ``output`` (the thesis's rule) only
when its value is the output itself, up to reshapes."""
_RESHAPES_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous"}
_RESHAPES_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}


def _is_reshape(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_method":
        return node.target in _RESHAPES_METHODS
    if node.op == "call_function":
        return node.target in _RESHAPES_FUNCTIONS
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), (nn.Flatten, nn.Identity, nn.Unflatten))
    return False


def final_nodes(gm: fx.GraphModule, rule: str = "parametrised") -> set[fx.Node]:
    """The nodes whose activations are final under ``rule`` (see :data:`FINAL_RULES`)."""
    check_final_rule(rule)
    if rule == "parametrised":
        return reaches_output_freely(gm)
    out: set[fx.Node] = set()
    for node in reversed(gm.graph.nodes):
        for user in node.users:
            if user.op == "output" or (user in out and _is_reshape(user, gm)):
                out.add(node)
                break
    return out


def check_final_rule(rule: str) -> str:
    if rule not in FINAL_RULES:
        raise SurgeryError(
            f"invalid final rule {rule!r}", hint=f"choose {' or '.join(FINAL_RULES)}"
        )
    return rule


def reaches_output_freely(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value reaches the output through no parametrised node."""
    free: set[fx.Node] = set()
    for node in reversed(gm.graph.nodes):
        for user in node.users:
            if user.op == "output" or (user in free and not _is_parametrised(user, gm)):
                free.add(node)
                break
    return free


# ---------------------------------------------------------------- channel axis

_FIRST_FUNCTIONS = {
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.batch_norm, F.group_norm, F.instance_norm, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d, F.interpolate, F.pixel_shuffle, torch.conv2d, torch.batch_norm,
}  # fmt: skip
_LAST_FUNCTIONS = {F.linear, F.layer_norm, F.embedding, F.scaled_dot_product_attention, torch.matmul, operator.matmul, F.rms_norm}  # fmt: skip
_FIRST_MODULES = (
    nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm, nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd, nn.Upsample, nn.PixelShuffle, nn.LocalResponseNorm,
)  # fmt: skip
_LAST_MODULES = (nn.Linear, nn.LayerNorm, nn.Embedding, nn.MultiheadAttention, nn.RMSNorm)


def module_layout(mod: nn.Module) -> str | None:
    """``"first"`` (channel at dim 1), ``"last"`` or None, from the layer's own type."""
    name = type(mod).__name__
    if name.endswith(("1d", "2d", "3d", "2D", "NCHW")) or name.startswith("GroupNorm"):
        return "first"  # Conv2d, BatchNorm2d, timm's LayerNorm2d, BatchNormAct2d, ...
    if isinstance(mod, _FIRST_MODULES):
        return "first"
    if isinstance(mod, _LAST_MODULES) or name.startswith(("LayerNorm", "RmsNorm")):
        return "last"
    return None


def _layout(node: fx.Node, gm: fx.GraphModule) -> str | None:
    if node.op == "call_module":
        return module_layout(gm.get_submodule(node.target))
    if node.op == "call_function":
        if node.target in _FIRST_FUNCTIONS:
            return "first"
        if node.target in _LAST_FUNCTIONS:
            return "last"
    return None


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _perm(node: fx.Node) -> list[int] | None:
    args = node.args[1:] if node.op == "call_method" else node.args[1:]
    dims = node.kwargs.get("dims", args[0] if len(args) == 1 else args)
    if isinstance(dims, (list, tuple)) and all(isinstance(d, int) for d in dims):
        return list(dims)
    return None


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if node_shape(a) is not None]


def channel_dim_of(node: fx.Node, gm: fx.GraphModule, _depth: int = 0) -> int | None:
    """Channel dim of ``node``'s output, inferred from the layer that produced it."""
    shape = node_shape(node)
    if shape is None or _depth > 64:
        return None
    ndim = len(shape)
    layout = _layout(node, gm)
    if layout is not None:
        return 1 if layout == "first" else ndim - 1
    if node.op in ("call_method", "call_function") and node.target in ("permute", torch.permute):
        perm = _perm(node)
        src = node.args[0]
        c = channel_dim_of(src, gm, _depth + 1) if isinstance(src, fx.Node) else None
        if perm is not None and c is not None:
            return [_norm_dim(p, ndim) for p in perm].index(c)
        return None
    if node.op in ("call_method", "call_function") and node.target in (
        "transpose",
        torch.transpose,
    ):
        src = node.args[0]
        c = channel_dim_of(src, gm, _depth + 1) if isinstance(src, fx.Node) else None
        a, b = (_norm_dim(int(d), ndim) for d in node.args[1:3])
        if c is None:
            return None
        return b if c == a else a if c == b else c
    # shape-preserving nodes (activations, elementwise ops, dropout, opaque leaves): look through
    for src in _tensor_inputs(node):
        if node_shape(src) == shape:
            c = channel_dim_of(src, gm, _depth + 1)
            if c is not None:
                return c
    return None


def consumer_channel_dim(node: fx.Node, gm: fx.GraphModule, _depth: int = 0) -> int | None:
    """Channel dim expected by the first layout-defining layer that consumes ``node``."""
    shape = node_shape(node)
    if shape is None or _depth > 64:
        return None
    for user in node.users:
        layout = _layout(user, gm)
        if layout is not None:
            return 1 if layout == "first" else len(shape) - 1
        if node_shape(user) == shape:
            c = consumer_channel_dim(user, gm, _depth + 1)
            if c is not None:
                return c
    return None


def infer_channel_dim(node: fx.Node, gm: fx.GraphModule) -> int:
    """Producer first, then consumers, then the rank rule (NCHW for 4-D/5-D, last otherwise)."""
    shape = node_shape(node) or ()
    c = channel_dim_of(node, gm) if node.op != "placeholder" else None
    if c is None:
        c = consumer_channel_dim(node, gm)
    if c is None or c == 0:
        c = 1 if len(shape) >= 4 else max(len(shape) - 1, 1)
    return c


# ---------------------------------------------------------------- the sites


def _site_node_for_gate(node: fx.Node) -> tuple[str, fx.Node] | None:
    """For a sigmoid-like node: ``("gate", node)``, ``("activation", product)`` or None."""
    src = node.args[0] if node.args else None
    for user in node.users:
        if not _is_mul(user):
            continue
        others = [a for a in user.args if a is not node]
        for other in others:
            if other is src or (
                isinstance(src, fx.Node)
                and _is_mul(src)
                and other in src.args
                and any(isinstance(a, (int, float)) for a in src.args)
            ):
                return "activation", user  # x * sigmoid(x) or x * sigmoid(k * x)
        return "gate", node
    return None


PLACEMENTS = ("activations", "ssf")
"""Where the sites are: ``activations`` (the thesis: the input and every non-final
activation) or ``ssf`` (Lian et al. 2022, scale-and-shift fine-tuning: the output of every
linear, convolution and normalisation layer, the classifier excepted)."""
_SSF_MODULES = (
    nn.Linear, nn.modules.conv._ConvNd, nn.LayerNorm, nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm, nn.RMSNorm,
)  # fmt: skip


def check_placement(placement: str) -> str:
    if placement not in PLACEMENTS:
        raise SurgeryError(
            f"invalid placement {placement!r}", hint=f"choose {' or '.join(PLACEMENTS)}"
        )
    return placement


_SSF_FUNCTIONS = {
    F.linear: "linear", F.conv1d: "linear", F.conv2d: "linear", F.conv3d: "linear",
    F.layer_norm: "norm", F.group_norm: "norm", F.batch_norm: "norm", F.rms_norm: "norm",
}  # fmt: skip


def _ssf_kind(node: fx.Node, gm: fx.GraphModule) -> tuple[str, str, bool] | None:
    """A linear, conv or norm layer's output (module, or function with its own parameters,
    as timm's LayerNorm calls ``F.layer_norm``): ``(kind, target, False)``."""
    if node.op == "call_function" and node.target in _SSF_FUNCTIONS:
        if _is_parametrised(node, gm):
            return _SSF_FUNCTIONS[node.target], describe(node.target), False
        return None
    if node.op != "call_module":
        return None
    mod = gm.get_submodule(node.target)
    if not isinstance(mod, _SSF_MODULES) or not any(True for _ in mod.parameters()):
        return None
    kind = (
        "norm"
        if isinstance(
            mod, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)
        )
        else "linear"
    )
    return kind, describe(type(mod)), False


def discover(
    gm: fx.GraphModule, final: str = "parametrised", placement: str = "activations"
) -> list[Site]:
    """All sites of a shape-propagated graph, final ones (``final`` rule) excluded.
    ``placement`` says which nodes are sites (:data:`PLACEMENTS`)."""
    free = final_nodes(gm, final)
    ssf = check_placement(placement) == "ssf"
    sites: list[Site] = []
    seen: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if ssf:
            hit = _ssf_kind(node, gm)
            if hit is None:
                continue
            entry = (hit[0], hit[1], node)
        elif node.op == "placeholder":
            shape, dtype = node_shape(node), node_dtype(node)
            if shape is None or dtype is None or not dtype.is_floating_point or not node.users:
                continue
            entry = ("input", "input", node)
        else:
            hit = classify(node, gm)
            if hit is None:
                continue
            kind, target, gate_candidate = hit
            site_node = node
            if gate_candidate:
                gated = _site_node_for_gate(node)
                if gated is not None:
                    kind, site_node = gated
                    if site_node is not node:
                        target = f"x*{target}(x)"
            entry = (kind, target, site_node)
        kind, target, site_node = entry
        shape, dtype = node_shape(site_node), node_dtype(site_node)
        if site_node in seen or shape is None or dtype is None or not dtype.is_floating_point:
            continue
        if kind != "input" and site_node in free:
            continue  # final: reaches the output without another parametrised layer
        seen.add(site_node)
        sites.append(
            GraphSite(
                index=len(sites),
                name=site_node.name,
                kind=kind,
                target=target,
                shape=(-1, *shape[1:]),  # -1: any batch size
                channel_dim=infer_channel_dim(site_node, gm),
                node=site_node,
            )
        )
    return sites


def select(
    sites: Sequence[Site], include: Iterable[str] = (), exclude: Iterable[str] = ()
) -> list[Site]:
    """Keep sites matching any ``include`` pattern (all if none) and no ``exclude`` pattern.

    A pattern matches a site's kind exactly (``gate``) or its node name as a glob (``layer3*``).
    """
    include, exclude = list(include), list(exclude)

    def match(site: Site, pat: str) -> bool:
        return pat == site.kind or fnmatch.fnmatchcase(site.name, pat)

    for pat in include + exclude:
        if not pat:
            raise SurgeryError("empty site pattern", hint="give a node-name glob or a kind")
    kept = [
        s
        for s in sites
        if (not include or any(match(s, p) for p in include))
        and not any(match(s, p) for p in exclude)
    ]
    return kept
