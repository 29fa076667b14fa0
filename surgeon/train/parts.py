"""What trains: ``--train-only ss,head,norm,bias`` picks parameters; the rest is frozen.

A frozen parameter has ``requires_grad=False`` and stays out of the optimiser (no momentum
buffer), so it is bit-for-bit the value it started with. Batch norms whose affine
parameters are frozen are also held in eval mode (their running statistics stay the
base's), so the frozen part of the model computes exactly the base's function and an
adapter (the trained tensors alone) rebuilds the trained model.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import fx, nn

from ..errors import TrainError
from ..layers import ShiftScale
from .config import TRAIN_PARTS

PARTS = TRAIN_PARTS
_HEAD_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def parse_parts(spec: str) -> list[str]:
    """``"ss,head"`` -> ``["ss", "head"]``; empty: everything trains."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise TrainError(
            f"unknown --train-only part(s): {', '.join(unknown)}",
            hint=f"a comma list of {', '.join(PARTS)} (empty: everything trains)",
        )
    return parts


def is_norm(module: nn.Module) -> bool:
    """Batch/layer/group/instance norms, timm's norm layers and the inserted BatchNorm."""
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
    return isinstance(module, norms) or (
        not isinstance(module, ShiftScale) and "Norm" in type(module).__name__
    )


def head_names(model: nn.Module) -> list[str]:
    """The classifier's module name(s): timm's ``get_classifier()``; else the Linear/conv the
    output is computed from (walking back through parameter-free ops of a traced graph);
    else the last Linear/conv of the model."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        names = [n for n, m in model.named_modules() if m is head and n]
        if names and any(True for _ in head.parameters()):
            return names[:1]
    if isinstance(model, fx.GraphModule):
        found = _head_from_graph(model)
        if found:
            return [found]
    last = [n for n, m in model.named_modules() if isinstance(m, _HEAD_TYPES)]
    if not last:
        raise TrainError(
            "--train-only head: found no classifier (no get_classifier(), Linear or conv)",
            hint="train other parts (ss, norm, bias)",
        )
    return last[-1:]


def _head_from_graph(gm: fx.GraphModule) -> str | None:
    out = next((n for n in reversed(gm.graph.nodes) if n.op == "output"), None)
    node = out.args[0] if out is not None else None
    seen = 0
    while isinstance(node, (fx.Node, tuple, list)) and seen < 64:
        seen += 1
        if isinstance(node, (tuple, list)):  # a tuple output: its first tensor
            node = next((a for a in node if isinstance(a, fx.Node)), None)
            continue
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            if isinstance(mod, _HEAD_TYPES):
                return str(node.target)
            if any(True for _ in mod.parameters(recurse=True)):
                return None  # a parametrised layer that is not a classifier
        if node.op not in ("call_module", "call_function", "call_method"):
            return None
        node = next((a for a in node.args if isinstance(a, fx.Node)), None)
    return None


def trainable_names(model: nn.Module, parts: Iterable[str]) -> set[str]:
    """The parameter names ``parts`` select (all of them when ``parts`` is empty)."""
    parts = list(parts)
    names = dict(model.named_parameters())
    if not parts:
        return set(names)
    chosen: set[str] = set()
    heads = head_names(model) if "head" in parts else []
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        own = [prefix + p for p, _ in module.named_parameters(recurse=False)]
        if "ss" in parts and isinstance(module, ShiftScale):
            chosen.update(own)
        if "norm" in parts and is_norm(module):
            chosen.update(own)
        if any(mname == h or mname.startswith(h + ".") for h in heads):
            chosen.update(own)
    if "bias" in parts:
        chosen.update(n for n in names if n.rsplit(".", 1)[-1] == "bias")
    return chosen & set(names)


def freeze(model: nn.Module, parts: Iterable[str]) -> set[str]:
    """Set ``requires_grad`` from ``parts``; hold the frozen batch norms in eval mode.
    Returns the trainable names."""
    parts = list(parts)
    keep = trainable_names(model, parts)
    if not keep:
        raise TrainError(
            f"--train-only {','.join(parts)} selects no parameter of this model",
            hint="add parts (e.g. head), or insert shift/scale (--shift/--scale not none)",
        )
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
    if parts and "norm" not in parts:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.register_forward_pre_hook(_hold_eval)
    return keep


def _hold_eval(module: nn.Module, args: tuple) -> None:
    """A frozen batch norm normalises with the base's running statistics, never updates them."""
    module.training = False


def counts(model: nn.Module) -> dict[str, float]:
    """Trainable and total parameter counts (each tensor once) and the fraction."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    train = sum(p.numel() for p in seen.values() if p.requires_grad)
    return {
        "trainable_params": train,
        "total_params": total,
        "trainable_fraction": train / max(total, 1),
    }
