"""The summary of an insertion (what ``surgeon insert`` prints and ``--json`` writes):
sites, parameter counts, identity at init."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .models.sources import default_input_size
from .passes import inserted_modules
from .shapes import example_inputs_for
from .verify import max_abs_diff_at_init


def _count(p: torch.Tensor | None) -> int:
    return 0 if p is None else p.numel()


def insertion_summary(
    base: nn.Module | None,
    gm: nn.Module,
    *,
    spec: str,
    shift: str,
    scale: str,
    params_model: int | None = None,
    skip_check: str | None = None,
) -> dict[str, Any]:
    """The JSON object of ``surgeon insert --json``. ``skip_check`` says why the identity
    check at init did not run (``max_abs_diff_at_init`` is then None); it needs ``base``."""
    rec = gm.surgeon_record
    mods = inserted_modules(gm)
    sites = []
    for s in rec.sites:
        m = mods.get(s.module)
        sites.append(
            {
                "name": s.name,
                "kind": s.kind,
                "target": s.target,
                "shape": list(s.shape),
                "channel_dim": s.channel_dim,
                "module": s.module,
                "shift_params": _count(m.shift) if m is not None else 0,
                "scale_params": _count(m.scale) if m is not None else 0,
            }
        )
    added = sum(s["shift_params"] + s["scale_params"] for s in sites)
    if params_model is None:
        params_model = sum(p.numel() for p in base.parameters())
    size = rec.input_size()
    diff = None
    if skip_check is None:
        diff = max_abs_diff_at_init(base, gm, example_inputs_for(size or default_input_size(base)))
    return {
        "model": spec,
        "shift": shift,
        "scale": scale,
        "input_size": list(size) if size else None,
        "sites": sites,
        "params_added": added,
        "params_model": params_model,
        **({"max_abs_diff_at_init_skipped": skip_check} if skip_check else {}),
        "max_abs_diff_at_init": diff,
        "method": rec.method or "fx",  # fx, hybrid (+ sites inside leaves) or eager
        "unreached": rec.unreached or [],  # activation calls no site reaches, with reasons
        **({"traced_with": rec.traced_with} if rec.traced_with else {}),
    }
