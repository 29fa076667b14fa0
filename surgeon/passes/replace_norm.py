"""Replace BatchNorm with channel-wise shift/scale: a model with no batch statistics.

In eval mode BatchNorm computes ``y = (x - mean) / sqrt(var + eps) * gamma + beta``, a fixed
per-channel affine map. With ``scale = gamma / sqrt(var + eps)`` and
``shift = beta / scale - mean`` it is ``(x + shift) * scale``, a ``ShiftScale`` whose shift
and scale are learnable and which does the same thing in train mode with any batch size
(batch 1 included). A channel whose ``gamma`` is 0 outputs the constant ``beta``: exact with
``shift = -mean`` when ``beta`` is 0 too (zero-initialised residual branches), refused
otherwise, since ``(x + shift) * 0`` cannot be ``beta``.

timm's ``BatchNormAct2d`` becomes the shift/scale followed by its own dropout and
activation, as separate modules named ``<name>_drop`` and ``<name>_act``.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from torch import fx, nn

from .. import shapes
from ..attach import device_of, free_path, insert_after
from ..discover import analyse
from ..errors import SurgeryError
from ..layers import ChannelBatchNorm, make_shift_scale
from ..record import PassEntry, SurgeryRecord, finish, mode_of, register_pass

_PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, ChannelBatchNorm)


def _norm_act_class() -> type | None:
    if "timm" not in sys.modules:  # a model holding timm's BatchNormAct2d has imported timm
        return None
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    return BatchNormAct2d


def kind_of(mod: nn.Module) -> str | None:
    """``"bn"`` for a BatchNorm that computes what torch's does, ``"bn_act"`` for timm's
    BatchNormAct2d, else None (other subclasses may do anything in ``forward``)."""
    norm_act = _norm_act_class()
    if norm_act is not None and type(mod) is norm_act:
        return "bn_act"
    if isinstance(mod, _PLAIN) and any(type(mod).forward is c.forward for c in _PLAIN):
        return "bn"
    return None


@torch.no_grad()
def shift_scale_of(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(shift, scale)`` with ``(x + shift) * scale == bn(x)`` in eval mode, in float64."""
    mean, var = bn.running_mean.double(), bn.running_var.double()
    n = mean.numel()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones(n, dtype=torch.float64)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros(n, dtype=torch.float64)
    scale = gamma / torch.sqrt(var + bn.eps)
    zero = scale == 0
    shift = torch.where(zero, -mean, beta / torch.where(zero, torch.ones_like(scale), scale) - mean)
    return shift, scale


def _check(name: str, bn: nn.Module) -> None:
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        raise SurgeryError(
            f"cannot replace {name}: it keeps no running statistics (track_running_stats=False)",
            hint="such a BatchNorm normalises with batch statistics in eval mode too; exclude the model",
        )
    shift, scale = shift_scale_of(bn)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    bad = (scale == 0) & (beta.double() != 0)
    if bad.any():
        raise SurgeryError(
            f"cannot replace {name}: {int(bad.sum())} channel(s) have gamma 0 and beta != 0 "
            "(a constant output that (x + shift) * scale cannot give)",
            hint="set those gammas to a tiny non-zero value first, or keep this model's BatchNorm",
        )
    if not (torch.isfinite(shift).all() and torch.isfinite(scale).all()):
        raise SurgeryError(
            f"cannot replace {name}: its statistics or affine parameters are not finite",
            hint="check the running_var and weights of this layer",
        )


def _replay(model: nn.Module, p: PassEntry) -> fx.GraphModule:
    # shapes from the graph, values from the saved weights
    return replace_norm(model, **p.pick("input_size", "leaf"), from_stats=False)


@register_pass("replace_norm", replay=_replay)
def replace_norm(
    model: nn.Module,
    *,
    input_size: Sequence[int] | str | None = None,
    leaf: Iterable[str | type] = (),
    from_stats: bool = True,
) -> fx.GraphModule:
    """Replace every BatchNorm (1d/2d/3d, SyncBatchNorm, timm's BatchNormAct2d) by a
    channel-wise :class:`ShiftScale` equal to it in eval mode. Returns a new GraphModule.

    With ``from_stats=False`` the modules start at identity (used when a saved model is
    rebuilt: its values come from the saved weights).
    """
    record = SurgeryRecord.of(model)
    a = analyse(model, input_size=input_size, leaf=leaf)
    gm = a.gm
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    todo: list[tuple[fx.Node, nn.Module, str]] = []
    skipped: list[dict[str, str]] = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        kind = kind_of(mod)
        if kind is None:
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                why = f"{type(mod).__name__} overrides forward"
                skipped.append({"module": node.target, "reason": why})
            continue
        if calls[node.target] > 1:
            skipped.append({"module": node.target, "reason": "called more than once"})
            continue
        if from_stats:
            _check(node.target, mod)
        todo.append((node, mod, kind))
    device = device_of(gm)
    replaced = []
    for node, bn, kind in todo:  # all checks passed: change the graph
        shape = shapes.node_shape(node.args[0])
        cdim = int(getattr(bn, "channel_dim", 1))
        values = None
        if from_stats:
            shift, scale = shift_scale_of(bn)
            values = {"shift": shift.float(), "scale": scale.float()}
        ss = make_shift_scale("channel", "channel", shape[1:], cdim, device=device, values=values)
        gm.add_submodule(node.target, ss)  # the same name: the weights keep their keys
        if kind == "bn_act":
            _split_norm_act(gm, node, bn)
        replaced.append(node.target)
    traced_in = mode_of(model)
    record.passes.append(
        PassEntry(
            "replace_norm",
            {"input_size": list(a.input_size), "leaf": a.leaf, "traced_in": traced_in},
        )
    )
    record.replace_norm = {"replaced": replaced, "skipped": skipped}
    return finish(gm, record, model.training)


def _split_norm_act(gm: fx.GraphModule, node: fx.Node, bn: nn.Module) -> None:
    """After the shift/scale that replaced a BatchNormAct2d, call its dropout and activation."""
    last = node
    for part in ("drop", "act"):
        mod = getattr(bn, part, None)
        if mod is not None and not isinstance(mod, nn.Identity):
            last = insert_after(gm, last, free_path(gm, f"{node.target}_{part}"), mod)
