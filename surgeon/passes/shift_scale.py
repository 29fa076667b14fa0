"""The shift/scale passes: insert shift/scale after each site, insert BatchNorm before each
activation, and strip what was inserted.

Every pass takes an ``nn.Module`` and returns a new one (an ``fx.GraphModule`` unless the
eager fallback was taken); the caller's model is left untouched and all options are checked
before anything changes. Each pass is analyse → select → attach → record: the sites of
:func:`surgeon.discover.analyse` attach their own modules (:meth:`surgeon.sites.Site.attach`),
and the pass adds its entry to the model's :class:`surgeon.record.SurgeryRecord`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import fx, nn

from .. import sites as sites_mod
from ..attach import detach_all, device_of, free_name
from ..discover import analyse, gc_paused
from ..errors import SurgeryError
from ..layers import ChannelBatchNorm, ReLUShiftScale, ShiftScale, make_shift_scale
from ..modes import check_mode
from ..record import PassEntry, SurgeryRecord, finish, mode_of, register_pass
from ..shapes import node_shape
from ..sites import Site

BN_PREFIX = "bn_"


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
    final: str = "parametrised",
) -> list[Site]:
    """The sites ``insert`` would use, in graph order (options as in :func:`insert`)."""
    a = analyse(
        model, input_size=input_size, example_inputs=example_inputs, leaf=leaf,
        fallback=fallback, final=final,
    )  # fmt: skip
    return sites_mod.select(a.sites, include, exclude)


def _replay_insert(model: nn.Module, p: PassEntry) -> nn.Module:
    opts = p.pick(
        "include", "exclude", "input_size", "leaf", "fused", "fallback", "final", "placement"
    )
    return insert(model, p.options["shift"], p.options["scale"], **opts)


@register_pass("shift_scale", replay=_replay_insert)
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
    inplace: bool = False,
    final: str = "parametrised",
    placement: str = "activations",
    init_std: float = 0.0,
) -> nn.Module:
    """Insert ``ShiftScale(shift, scale)`` after the model's input and every non-final
    activation. Returns a new model that computes exactly the same outputs at init.

    Activation modules inside leaf modules get module-level sites (method ``hybrid``). A
    model torch.fx cannot trace gets module-level sites only (method ``eager``): the result
    is then a copy of the model itself. ``surgeon_record.method`` says which.

    Args:
        shift, scale: ``none``, ``element``, ``channel`` or ``layer``.
        include, exclude: site kinds (``input``, ``activation``, ``gate``, ``softmax``,
            ``norm_act``) or node-name globs.
        input_size: ``(C, H, W)`` for shape propagation; defaults to the model's own.
        example_inputs: tensors to propagate instead of a random input of ``input_size``.
        leaf: extra leaf module classes (or class names) for the tracer.
        fused: make the modules use the one-pass op of :mod:`surgeon.ops`.
        fallback: when torch.fx cannot trace the model: ``auto`` (the default) inserts at
            module level (the eager fallback) with a one-line warning, unless that reaches no
            activation call, when it raises the tracer's error; ``eager`` always inserts at
            module level; ``never`` raises the tracer's error.
        inplace: work on ``model`` itself, not a copy: no second copy of the weights, and
            ``model`` is given up (its modules belong to the result).
        final: which activations are final (no site): ``parametrised`` (the default) when
            the value reaches the output through no parametrised layer (a ReLU before global
            pooling and a softmax head), ``output`` only the output itself up to reshapes
            (the thesis's rule: after every activation but the output nonlinearity).
        placement: ``activations`` (the thesis's sites) or ``ssf`` (after every linear,
            conv and norm layer but the classifier, as SSF fine-tuning places them).
        init_std: 0 (the default) starts every module at the identity; SSF draws scales from
            N(1, init_std) and shifts from N(0, init_std) (the output then differs at init).
    """
    check_mode(shift, "shift mode")
    check_mode(scale, "scale mode")
    include, exclude, leaf = list(include), list(exclude), list(leaf)
    record = SurgeryRecord.of(model)
    training = model.training
    a = analyse(
        model, input_size=input_size, example_inputs=example_inputs, leaf=leaf,
        fallback=fallback, inplace=inplace, final=final, placement=placement,
    )  # fmt: skip
    chosen = sites_mod.select(a.sites, include, exclude)
    if shift == "none" and scale == "none":
        chosen = []
    device = device_of(a.model)
    for site in chosen:
        layer = make_shift_scale(
            shift, scale, site.feature_shape, site.channel_dim, fused=fused, device=device
        )
        if init_std:
            _ssf_init(layer, init_std)
        site.module = site.attach(a.model, layer)
    if a.fallback_reason is not None:
        msg = f"{a.fallback_reason.message}; inserted at module level instead (method: eager)"
        warnings.warn(msg, stacklevel=3)
        record.warn(msg)
    record.passes.append(
        PassEntry(
            "shift_scale",
            {
                "shift": shift,
                "scale": scale,
                "include": include,
                "exclude": exclude,
                "input_size": list(a.input_size),
                "leaf": a.leaf,
                "traced_in": mode_of(model),
                "fused": bool(fused),
                "method": a.method,
                # replayed by surgeon.load with the method it took: eager, or FX and never eager
                "fallback": "eager" if a.method == "eager" else "never",
                **({"final": final} if final != "parametrised" else {}),
                **({"placement": placement} if placement != "activations" else {}),
            },
        )  # fmt: skip
    )
    record.sites = [s.description() for s in chosen]
    record.method, record.finals, record.unreached = a.method, a.finals, a.unreached
    record.traced_with = copy.deepcopy(getattr(a.model, "surgeon_traced_with", None))
    return finish(a.model, record, training)


@torch.no_grad()
def _ssf_init(layer: ShiftScale, std: float) -> None:
    if layer.scale is not None:
        layer.scale.normal_(1.0, std)
    if layer.shift is not None:
        layer.shift.normal_(0.0, std)


def _replay_batchnorm(model: nn.Module, p: PassEntry) -> nn.Module:
    return insert_batchnorm(model, **p.pick("include", "exclude", "input_size", "leaf", "final"))


@register_pass("batchnorm", replay=_replay_batchnorm)
@gc_paused
def insert_batchnorm(
    model: nn.Module,
    *,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    input_size: Sequence[int] | str | None = None,
    leaf: Iterable[str | type] = (),
    final: str = "parametrised",
) -> fx.GraphModule:
    """Insert BatchNorm (1d/2d/3d as the shape requires) before each non-final activation
    (``final`` as in :func:`insert`).

    Only plain activations get one (not inputs, gates, softmax or fused norm+act layers).
    """
    include, exclude = list(include), list(exclude)
    record = SurgeryRecord.of(model)
    a = analyse(model, input_size=input_size, leaf=leaf, final=final)
    gm = a.gm
    chosen = [s for s in sites_mod.select(a.sites, include, exclude) if s.kind == "activation"]
    device = device_of(gm)
    added = []
    for site in chosen:
        node = getattr(site, "node", None)  # module-level sites (inside leaves) get none
        if node is None:
            continue
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if src is None or sites_mod._is_mul(node) or (_is_inplace(node, gm) and len(src.users) > 1):
            continue  # an in-place activation on a shared tensor: a BN in between changes semantics
        shape = node_shape(src)
        if shape is None or len(shape) < 2:
            continue
        cdim = sites_mod.infer_channel_dim(src, gm)
        name = free_name(gm, BN_PREFIX + site.name)
        gm.add_submodule(name, ChannelBatchNorm(shape[cdim], len(shape), cdim).to(device))
        with gm.graph.inserting_before(node):
            bn = gm.graph.call_module(name, (src,))
        node.replace_input_with(src, bn)
        added.append(name)
    record.passes.append(
        PassEntry(
            "batchnorm",
            {
                "include": include,
                "exclude": exclude,
                "input_size": list(a.input_size),
                "leaf": a.leaf,
                "traced_in": mode_of(model),
                **({"final": final} if final != "parametrised" else {}),
            },
        )  # fmt: skip
    )
    record.batchnorm = added
    return finish(gm, record, model.training)


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
    record = getattr(model, "surgeon_record", None)
    names = record.inserted() if record is not None else []
    return {n: model.get_submodule(n) for n in names}


def strip(model: nn.Module) -> nn.Module:
    """Remove the inserted shift/scale modules: the original computation, on a copy.

    Shift/scale modules that are part of the model's function stay: one that replaced a
    BatchNorm (``replace_norm``) or absorbed one; a ReLU merged by ``fuse_relu`` comes back.
    """
    record = SurgeryRecord.of(model)
    if not isinstance(model, fx.GraphModule) and record.method != "eager":
        raise SurgeryError(
            "strip needs a surgered GraphModule", hint="pass the model insert() returned"
        )
    m = copy.deepcopy(model)
    detach_all(m)  # module-level sites (hybrid and eager)
    if isinstance(m, fx.GraphModule):
        _strip_graph(m, set(record.inserted()))
    dropped = ("shift_scale", "fuse_relu", "unfuse_relu")
    record.passes = [p for p in record.passes if p.name not in dropped]
    record.sites = []
    return finish(m, record, model.training)


def _strip_graph(gm: fx.GraphModule, inserted: set[str]) -> None:
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.target not in inserted:
            continue
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, ShiftScale):
            continue
        keep = node.args[0]
        if isinstance(mod, ReLUShiftScale):  # fuse_relu's merge: the ReLU stays
            with gm.graph.inserting_before(node):
                keep = gm.graph.call_function(torch.relu, (node.args[0],))
        node.replace_all_uses_with(keep)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
