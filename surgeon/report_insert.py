"""The summary ``surgeon insert`` prints: sites, parameter counts, identity at init."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .models.sources import default_input_size
from .passes import inserted_modules
from .shapes import example_inputs_for


def _count(p: torch.Tensor | None) -> int:
    return 0 if p is None else p.numel()


@torch.no_grad()
def max_abs_diff_at_init(base: nn.Module, gm: nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
    """max |base(x) - gm(x)| in fp32 eval mode on ``inputs`` (0.0 means exact identity)."""
    was = base.training, gm.training
    base.eval()
    gm.eval()
    try:
        a, b = base(*inputs), gm(*inputs)
    finally:
        base.train(was[0])
        gm.train(was[1])
    flat_a, flat_b = _flatten(a), _flatten(b)
    if len(flat_a) != len(flat_b):
        return float("inf")
    diffs = [
        (x.float() - y.float()).abs().max().item()
        for x, y in zip(flat_a, flat_b, strict=True)
        if x.numel()
    ]
    return max(diffs, default=0.0)


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flatten(v)]
    return []


def insertion_summary(
    base: nn.Module, gm: nn.Module, *, spec: str, shift: str, scale: str
) -> dict[str, Any]:
    """The JSON object of ``surgeon insert --json``."""
    rec = gm.surgeon_record
    mods = inserted_modules(gm)
    sites = []
    for s in rec["sites"]:
        m = mods.get(s["module"])
        sites.append(
            {
                "name": s["name"],
                "kind": s["kind"],
                "target": s["target"],
                "shape": s["shape"],
                "channel_dim": s["channel_dim"],
                "module": s["module"],
                "shift_params": _count(m.shift) if m is not None else 0,
                "scale_params": _count(m.scale) if m is not None else 0,
            }
        )
    added = sum(s["shift_params"] + s["scale_params"] for s in sites)
    params_model = sum(p.numel() for p in base.parameters())
    size = next((p["input_size"] for p in reversed(rec["passes"]) if "input_size" in p), None)
    inputs = example_inputs_for(size or default_input_size(base))
    return {
        "model": spec,
        "shift": shift,
        "scale": scale,
        "input_size": list(size) if size else None,
        "sites": sites,
        "params_added": added,
        "params_model": params_model,
        "max_abs_diff_at_init": max_abs_diff_at_init(base, gm, inputs),
        "method": rec.get("method", "fx"),  # fx, hybrid (+ sites inside leaves) or eager
        "unreached": rec.get("unreached", []),  # activation calls no site reaches, with reasons
    }
