"""Folding shift/scale modules into the weights of an adjacent layer, where that is exact:
into the preceding Linear/conv/affine BatchNorm, or into every following Linear/conv (a
scale only before a zero-padded conv). What cannot fold stays, with its reason in the
:class:`FoldReport`. The decisions depend only on the graph and the modes, so
:func:`surgeon.load` replays a fold and then loads the weights. The algebra: docs/fold.md.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .. import shapes
from ..errors import SurgeryError
from ..example_tracing import reads_metadata_only
from ..layers import ChannelBatchNorm, ShiftScale, make_shift_scale
from ..record import PassEntry, SurgeryRecord, finish, register_pass
from ..verify import compare_outputs

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


@dataclass
class FoldEntry:
    """What happened to one shift/scale module."""

    module: str
    node: str
    action: str  # folded | scale folded | kept
    direction: str = ""  # preceding | following
    into: list[str] = field(default_factory=list)
    reason: str = ""


@dataclass
class FoldReport:
    """The outcome of :func:`fold`, one entry per shift/scale module in graph order."""

    entries: list[FoldEntry]
    modules_before: int
    modules_after: int
    max_abs_diff: float | None = None  # max |before(x) - after(x)|, eval mode
    max_abs_output: float | None = None  # max |before(x)|, for scale

    def count(self, action: str) -> int:
        return sum(e.action == action for e in self.entries)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["folded"], d["scale_folded"], d["kept"] = (
            self.count("folded"),
            self.count("scale folded"),
            self.count("kept"),
        )
        return d


# ---------------------------------------------------------------- what can fold


def _exact_forward(mod: nn.Module, classes: tuple[type, ...]) -> bool:
    """An instance of ``classes`` that computes what the base class computes (timm's
    Conv2dSame or StdConv2d override ``forward`` and do something else)."""
    if not isinstance(mod, classes):
        return False
    return any(type(mod).forward is c.forward for c in classes if isinstance(mod, c))


def _is_linear(mod: nn.Module) -> bool:
    return _exact_forward(mod, (nn.Linear,))


def _is_conv(mod: nn.Module) -> bool:
    return _exact_forward(mod, _CONVS)


def _is_batchnorm(mod: nn.Module) -> bool:
    return _exact_forward(mod, (*_BATCHNORMS, ChannelBatchNorm))


def _zero_padded(conv: nn.Module) -> bool:
    """Whether the conv pads with zeros (where a shift is not exact)."""
    if conv.padding_mode != "zeros":
        return False  # reflect/replicate/circular padding commutes with a per-channel shift
    if conv.padding == "valid":
        return False
    if conv.padding == "same":
        return any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in conv.padding)


def _drops(mod: nn.Module) -> bool:
    """A dropout that zeroes anything in train mode (``p > 0``)."""
    return isinstance(mod, _DROPOUTS) and mod.p > 0


def _varying_dims(ss: ShiftScale) -> set[int]:
    """Dims of the full tensor (batch = 0) along which ``a`` or ``b`` vary."""
    modes = {ss.shift_mode, ss.scale_mode} - {"none"}
    if "element" in modes:
        return set(range(1, len(ss.feature_shape) + 1))
    if "channel" in modes:
        return {ss.channel_dim}
    return set()


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _flatten_args(node: fx.Node, gm: fx.GraphModule) -> tuple[int, int] | None:
    """``(start_dim, end_dim)`` of a flatten node, else None."""
    mod = _module(gm, node)
    if isinstance(mod, nn.Flatten):
        return mod.start_dim, mod.end_dim
    if (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten"
    ):
        rest = list(node.args[1:])
        start = node.kwargs.get("start_dim", rest[0] if rest else 0)
        end = node.kwargs.get("end_dim", rest[1] if len(rest) > 1 else -1)
        if isinstance(start, int) and isinstance(end, int):
            return start, end
    return None


class _Context:
    """Per-graph facts: how often each module is called and each parameter is shared."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        self.param_refs = Counter(id(p) for _, p in gm.named_parameters(remove_duplicate=False))

    def owned(self, node: fx.Node) -> str | None:
        """None if the layer at ``node`` may be changed, else why not."""
        if self.calls[node.target] > 1:
            return f"{node.target} is called {self.calls[node.target]} times"
        mod = self.gm.get_submodule(node.target)
        if any(self.param_refs[id(p)] > 1 for p in mod.parameters(recurse=False)):
            return f"{node.target} shares its weights with another layer"
        return None


@dataclass
class _Target:
    node: fx.Node  # the layer that absorbs the affine map
    flat_shape: tuple[int, ...] | None  # the sample shape a Flatten in between flattened


_ADAPTIVE_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_ADAPTIVE_POOL_FNS = {
    torch.nn.functional.adaptive_avg_pool1d,
    torch.nn.functional.adaptive_avg_pool2d,
    torch.nn.functional.adaptive_avg_pool3d,
}
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)


def _average_kind(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """For a node that averages over positions per channel: ``"exact"``, or ``"zeros"`` when
    padding zeros (or a divisor override) enter the average; else None."""
    mod = _module(gm, node)
    if isinstance(mod, _ADAPTIVE_POOLS):
        return "exact"
    if isinstance(mod, _AVG_POOLS) and type(mod).forward in {c.forward for c in _AVG_POOLS}:
        pad = mod.padding if isinstance(mod.padding, tuple) else (mod.padding,)
        padded = any(p > 0 for p in pad) and mod.count_include_pad
        return "zeros" if padded or getattr(mod, "divisor_override", None) else "exact"
    if node.op == "call_function" and node.target in _ADAPTIVE_POOL_FNS:
        return "exact"
    if (node.op == "call_function" and node.target is torch.mean) or (
        node.op == "call_method" and node.target == "mean"
    ):
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        dims = (dims,) if isinstance(dims, int) else dims
        rank = len(shapes.node_shape(node.args[0]) or ())
        ok = isinstance(dims, (tuple, list)) and dims and all(isinstance(d, int) for d in dims)
        if ok and all((d + rank if d < 0 else d) >= 2 for d in dims) and "dtype" not in node.kwargs:
            return "exact"
    return None


def _following(ctx: _Context, node: fx.Node, ss: ShiftScale) -> tuple[list[_Target], str, str]:
    """Layers that can absorb the module's map from after it: ``(targets, scale_block,
    shift_block)``; a block is a reason (``""`` when nothing blocks)."""
    gm = ctx.gm
    targets: list[_Target] = []
    scale_block, shift_block = "", ""

    def walk(n: fx.Node, vary: set[int], flat: tuple[int, ...] | None, dropout: bool) -> None:
        nonlocal scale_block, shift_block
        shape = shapes.node_shape(n) or ()
        rank = len(shape)
        for user in n.users:
            if reads_metadata_only(user, n):  # x.shape: the same before and after folding
                continue
            mod = _module(gm, user)
            if isinstance(mod, (nn.Identity, *_DROPOUTS)):
                walk(user, vary, flat, dropout or _drops(mod))
                continue
            avg = _average_kind(user, gm)
            if avg is not None:
                if not vary <= {1} or flat is not None:
                    scale_block = scale_block or (
                        f"used by {user.name}, which averages over positions the map varies along"
                    )
                    continue
                if avg == "zeros":
                    shift_block = shift_block or (
                        f"{user.name} averages in padding zeros: a shift is not exact at the borders"
                    )
                walk(user, vary, flat, dropout)
                continue
            fa = _flatten_args(user, gm)
            if fa is not None:
                start, end = (d + rank if d < 0 else d for d in fa)
                if start != 1 or end != rank - 1:
                    scale_block = scale_block or f"used by {user.name}, a flatten of dims {fa}"
                    continue
                walk(
                    user,
                    {1} if vary else set(),
                    flat or (tuple(shape[1:]) if rank > 2 else None),
                    dropout,
                )
                continue
            if mod is None or not (_is_linear(mod) or _is_conv(mod)):
                what = type(mod).__name__ if mod is not None else str(user.target)
                what = getattr(user.target, "__name__", what) if mod is None else what
                scale_block = scale_block or f"used by {user.name} ({what}), not a Linear or conv"
                continue
            if user.args[0] is not n or n in user.args[1:] or user.kwargs:
                scale_block = scale_block or f"{user.name} reads it in an unusual way"
                continue
            owned = ctx.owned(user)
            if owned:
                scale_block = scale_block or owned
                continue
            allowed = {rank - 1} if _is_linear(mod) else {1}
            if not vary <= allowed:
                scale_block = scale_block or _vary_reason(ss, mod, user.target)
                continue
            if _is_conv(mod) and _zero_padded(mod):
                shift_block = shift_block or (
                    f"{user.target} pads with zeros: a shift is not exact at the borders"
                )
            if dropout:
                shift_block = shift_block or "a shift does not commute with dropout in train mode"
            targets.append(_Target(user, flat))

    walk(node, _varying_dims(ss), None, False)
    if not targets and not scale_block:
        scale_block = "its output is not used"
    return targets, scale_block, shift_block


def _preceding(ctx: _Context, node: fx.Node, ss: ShiftScale) -> tuple[fx.Node | None, str]:
    """The layer that can absorb the module's map from before it, else ``(None, reason)``."""
    gm, vary = ctx.gm, _varying_dims(ss)
    src = node.args[0]
    dropout = False
    while isinstance(src, fx.Node):
        mod = _module(gm, src)
        if len(src.users) != 1:
            return None, f"{src.name} has {len(src.users)} users"
        if isinstance(mod, (nn.Identity, *_DROPOUTS)):
            dropout = dropout or _drops(mod)
            src = src.args[0]
            continue
        break
    if not isinstance(src, fx.Node) or src.op != "call_module":
        name = src.name if isinstance(src, fx.Node) else repr(src)
        return None, f"the input {name} is not a layer's output"
    mod = gm.get_submodule(src.target)
    if not (_is_linear(mod) or _is_conv(mod) or _is_batchnorm(mod)):
        return None, f"{src.target} ({type(mod).__name__}) is not a Linear, conv or BatchNorm"
    if dropout and ss.shift is not None:
        return None, "a shift does not commute with dropout in train mode"
    owned = ctx.owned(src)
    if owned:
        return None, owned
    rank = len(shapes.node_shape(src) or ())
    if _is_linear(mod):
        allowed = {rank - 1}
    elif _is_batchnorm(mod):
        allowed = {getattr(mod, "channel_dim", 1)}
        if not mod.affine:
            return None, f"{src.target} has no affine parameters"
    else:
        allowed = {1}
    if not vary <= allowed:
        return None, _vary_reason(ss, mod, src.target)
    return src, ""


def _vary_reason(ss: ShiftScale, mod: nn.Module, name: str) -> str:
    element = "element" in (ss.shift_mode, ss.scale_mode)
    if element and _is_conv(mod):
        return f"the element mode varies per position; the conv {name} shares its weights over positions"
    what = "element" if element else "channel"
    return (
        f"the {what} mode varies along a dim that {name} ({type(mod).__name__}) does not keep apart"
    )


# ---------------------------------------------------------------- the algebra


def _vector(
    t: torch.Tensor, ss: ShiftScale, n: int, dim: int, flat: tuple[int, ...] | None
) -> torch.Tensor:
    """The map ``t`` (from ``effective_affine``) as an ``(n,)`` vector along ``dim`` of the
    layer's input, or over the features of a flattened sample of shape ``flat``."""
    t = t.double()
    if t.dim() == 0:
        return t.expand(n)
    if flat is None:
        if t.dim() == 1:  # channel mode (or a 1-D sample): a vector along the channel dim
            return t
        return t.movedim(dim - 1, -1).reshape(-1, t.shape[dim - 1])[0]
    if t.shape == torch.Size(flat):  # element mode, or a 1-D sample
        return t.reshape(-1)
    if tuple(flat) == ss.feature_shape:  # a channel vector, flattened with its sample
        return ss._to_sample(t, "channel").reshape(-1)
    # a channel vector (channel dim 1) after pooling changed the sample's positions
    return t.view(-1, *[1] * (len(flat) - 1)).expand(flat).reshape(-1)


def _set_bias(mod: nn.Module, value: torch.Tensor) -> None:
    ref = mod.weight
    if mod.bias is None:
        mod.bias = nn.Parameter(torch.zeros(value.shape, dtype=ref.dtype, device=ref.device))
    mod.bias.copy_(value.to(mod.bias.dtype))


@torch.no_grad()
def _into_following(mod: nn.Module, a: torch.Tensor, ab: torch.Tensor | None) -> None:
    """``mod(a * x + ab)`` becomes ``mod'(x)``; ``a``, ``ab``: vectors over input channels."""
    w = mod.weight.double()
    if _is_linear(mod):
        amat, abmat = a.view(1, -1), None if ab is None else ab.view(1, -1)
    else:  # (O, Cin/groups, *k): each output channel sees its group's inputs
        out, per = w.shape[0], w.shape[1]
        g = mod.groups
        amat = a.view(g, 1, per).expand(g, out // g, per).reshape(out, per)
        abmat = None
        if ab is not None:
            abmat = ab.view(g, 1, per).expand(g, out // g, per).reshape(out, per)
    spatial = [1] * (w.dim() - 2)
    if abmat is not None:
        add = (w * abmat.view(*abmat.shape, *spatial)).sum(dim=tuple(range(1, w.dim())))
        bias = mod.bias.double() if mod.bias is not None else torch.zeros_like(add)
        _set_bias(mod, bias + add)
    mod.weight.copy_((w * amat.view(*amat.shape, *spatial)).to(mod.weight.dtype))


@torch.no_grad()
def _into_preceding(mod: nn.Module, a: torch.Tensor, ab: torch.Tensor | None) -> None:
    """``a * mod(x) + ab`` becomes ``mod'(x)``; ``a``, ``ab``: vectors over output channels."""
    w = mod.weight.double()
    if _is_batchnorm(mod):
        mod.weight.copy_((w * a).to(mod.weight.dtype))
        bias = mod.bias.double() * a + (ab if ab is not None else 0)
        mod.bias.copy_(bias.to(mod.bias.dtype))
        return
    mod.weight.copy_((w * a.view(-1, *[1] * (w.dim() - 1))).to(mod.weight.dtype))
    if mod.bias is not None or ab is not None:
        bias = mod.bias.double() * a if mod.bias is not None else torch.zeros_like(a)
        _set_bias(mod, bias + (ab if ab is not None else 0))


def _channels_in(mod: nn.Module) -> int:
    return mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels


def _channels_out(mod: nn.Module) -> int:
    if isinstance(mod, nn.Linear):
        return mod.out_features
    return mod.num_features if _is_batchnorm(mod) else mod.out_channels


# ---------------------------------------------------------------- the pass


def _remove(gm: fx.GraphModule, node: fx.Node) -> None:
    node.replace_all_uses_with(node.args[0])
    gm.graph.erase_node(node)
    gm.delete_submodule(node.target)


def _input_size(rec: SurgeryRecord, input_size: Sequence[int] | None) -> tuple[int, ...]:
    if input_size is not None:
        return tuple(int(s) for s in input_size)
    if rec.input_size():
        return rec.input_size()
    raise SurgeryError(
        "fold needs the model's input size", hint="pass input_size=(C, H, W) to surgeon.fold"
    )


def _check_finite(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    for n in nodes:
        for pname, p in gm.get_submodule(n.target).named_parameters():
            if not torch.isfinite(p).all():
                raise SurgeryError(
                    f"cannot fold {n.target}: its {pname} has non-finite values",
                    hint="fold a model whose training did not diverge",
                )


def _replay(model: nn.Module, p: PassEntry) -> fx.GraphModule:
    # the fold's structure depends on the graph alone; the values come from the weights
    return fold(model, input_size=p.input_size, check=False)[0]


@register_pass("fold", replay=_replay)
def fold(
    model: nn.Module,
    *,
    input_size: Sequence[int] | None = None,
    example_inputs: Sequence[torch.Tensor] | None = None,
    check: bool = True,
) -> tuple[fx.GraphModule, FoldReport]:
    """Fold every shift/scale module of a surgered model into an adjacent layer where exact.

    Returns a new GraphModule (the caller's model is untouched) and a :class:`FoldReport`.
    ``input_size`` (C, H, W) defaults to the one recorded by the surgery; with ``check``
    the report holds max |before - after| on a random input in eval mode.
    """
    if not isinstance(model, fx.GraphModule):
        raise SurgeryError(
            "fold needs a surgered GraphModule",
            hint="pass the model surgeon.insert() or surgeon.replace_norm() returned, or surgeon.load(folder)",
        )
    rec = SurgeryRecord.of(model)
    if example_inputs is not None and input_size is None:
        inputs = tuple(example_inputs)
        size = tuple(int(d) for d in inputs[0].shape[1:])
    else:
        size = _input_size(rec, input_size)
        inputs = tuple(example_inputs or ()) or shapes.example_inputs_for(size)
    gm = copy.deepcopy(model)
    shapes.propagate(gm, inputs)
    nodes = [
        n
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ShiftScale)
    ]
    _check_finite(gm, nodes)  # all checks first: nothing is half-folded on error
    before = sum(1 for _ in gm.modules())
    calls = Counter(n.target for n in nodes)
    entries: list[FoldEntry] = []
    for node in nodes:
        entries.append(_fold_one(gm, node, calls[node.target]))
    _update_record(rec, entries, size)
    finish(gm, rec, model.training)
    report = FoldReport(entries, before, sum(1 for _ in gm.modules()))
    if check:
        report.max_abs_diff, report.max_abs_output = compare_outputs(model, gm, inputs)
    return gm, report


def _fold_one(gm: fx.GraphModule, node: fx.Node, calls: int) -> FoldEntry:
    ss: ShiftScale = gm.get_submodule(node.target)
    entry = FoldEntry(module=node.target, node=node.name, action="kept")
    if calls > 1:
        entry.reason = f"the module is called {calls} times"
        return entry
    if ss.shift is None and ss.scale is None:
        _remove(gm, node)
        entry.action, entry.reason = "folded", "an identity (both modes none)"
        return entry
    ctx = _Context(gm)
    a, ab = ss.effective_affine()
    has_shift = ss.shift is not None
    src, why_not_before = _preceding(ctx, node, ss)
    if src is not None:
        mod = gm.get_submodule(src.target)
        n, dim = _channels_out(mod), getattr(mod, "channel_dim", 1)
        if _is_linear(mod):
            dim = len(shapes.node_shape(src) or ()) - 1
        va, vab = _vector(a, ss, n, dim, None), _vector(ab, ss, n, dim, None)
        _into_preceding(mod, va, vab if has_shift else None)
        _remove(gm, node)
        entry.action, entry.direction, entry.into = "folded", "preceding", [src.target]
        return entry
    targets, scale_block, shift_block = _following(ctx, node, ss)
    if scale_block:
        entry.reason = f"before: {why_not_before}; after: {scale_block}"
        return entry
    fold_shift = has_shift and not shift_block
    if has_shift and ss.scale is None and not fold_shift:
        entry.reason = f"before: {why_not_before}; after: {shift_block}"
        return entry
    if len({t.node.target for t in targets}) != len(targets):
        entry.reason = "a following layer reads it twice"
        return entry
    for t in targets:
        mod = gm.get_submodule(t.node.target)
        n = _channels_in(mod)
        rank = len(shapes.node_shape(t.node.args[0]) or ())
        dim = rank - 1 if _is_linear(mod) else 1
        va = _vector(a, ss, n, dim, t.flat_shape)
        if fold_shift:
            _into_following(mod, va, _vector(ab, ss, n, dim, t.flat_shape))
        else:
            _into_following(mod, va, None)
    entry.direction, entry.into = "following", [t.node.target for t in targets]
    if fold_shift or not has_shift:
        _remove(gm, node)
        entry.action = "folded"
        return entry
    # the scale moved into the following layers; a shift-only module stays
    rest = make_shift_scale(
        ss.shift_mode, "none", ss.feature_shape, ss.channel_dim, fused=ss.fused,
        device=ss.shift.device, values={"shift": ss.shift},
    )  # fmt: skip
    gm.add_submodule(node.target, rest)
    entry.action, entry.reason = "scale folded", f"shift kept: {shift_block}"
    return entry


def _update_record(rec: SurgeryRecord, entries: list[FoldEntry], size: tuple[int, ...]) -> None:
    rec.passes.append(PassEntry("fold", {"input_size": list(size)}))
    by_module = {e.module: e for e in entries}
    for site in rec.sites:
        e = by_module.get(site.module)
        if e is None:
            continue
        if e.action == "folded":
            site.module = ""
            site.folded_into = list(e.into)
        elif e.action == "scale folded":
            site.scale_folded_into = list(e.into)
    rec.fold = {
        "folded": [e.module for e in entries if e.action == "folded"],
        "scale_folded": [e.module for e in entries if e.action == "scale folded"],
        "kept": [e.module for e in entries if e.action == "kept"],
    }
