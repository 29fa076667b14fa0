"""The eager fallback: module-level insertion for models torch.fx cannot trace.

Without a graph, a site is an activation module (or fused norm+activation module) that
runs in the forward pass, and the model's first input. Each gets a shift/scale module
through a hook (:mod:`surgeon.attach`): after the activation module, before the model.
Shapes come from one forward run on meta tensors, else fake tensors, else (below
``shapes.REAL_FORWARD_MAX_PARAMS`` parameters) real ones. Activation *functions*
(``F.gelu(x)``, ``x.softmax(-1)``) cannot be reached this way; they are counted during the
same run and listed as unreached. An activation is final (no site) when no parametrised
module runs after it.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from . import module_sites, shapes
from .observer import Call, Observer
from .sites import InputSite, Site
from .tracing import deepcopy_module


class Observed(NamedTuple):
    """A copy of the model, its sites, and the activation calls that are not sites."""

    model: nn.Module
    sites: list[Site]
    finals: list[dict]
    unreached: list[dict]


def _first_param(model: nn.Module) -> str:
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = []
    return params[0] if params else "x"


def _observe(model: nn.Module, inputs: Sequence[torch.Tensor], obs: Observer) -> None:
    """One forward run of ``model`` watched by ``obs``: on meta, fake or real tensors."""
    shapes.first_that_runs(
        model, inputs, lambda m, xs, kind: m(*xs), "eager shape run", before_each=obs.reset
    )


def analyse_eager(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    opaque: Sequence[type] = (),
    copy_model: bool = True,
    final: str = "parametrised",
) -> Observed:
    """Find the module-level sites of a deep copy of ``model`` (of ``model`` itself without
    ``copy_model``) by running it once."""
    m = deepcopy_module(model) if copy_model else model
    everything = module_sites.activation_modules(m, enter_all=True)
    reachable = module_sites.activation_modules(m, opaque=tuple(opaque))
    targets = {p: v[0] for p, v in reachable.items() if not module_sites.has_attached(v[0])}
    others = {p: v[0] for p, v in everything.items() if p not in reachable}
    kinds = {p: (v[1], v[2]) for p, v in reachable.items()}
    obs = Observer({"": m}, targets, others)
    with obs:
        _observe(m, inputs, obs)

    def reason(call: Call) -> str:
        where = call.path or "the model's forward"
        if call.site:
            return f"{call.target} at {where}"
        if call.target.startswith(("F.", "torch.", "Tensor.")) or call.path not in others:
            return (
                f"{call.target} called in {where}: a function, and the eager fallback "
                "reaches activation modules only"
            )
        return f"{call.target} at {where} is inside a torch.nn block or a --leaf module"

    # under the "output" rule only the output itself is final, which hooks cannot see
    found = module_sites.collect(obs, kinds, {""} if final == "parametrised" else set(), reason)
    param = _first_param(m)
    sites: list[Site] = []
    x = inputs[0] if inputs else None
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 1:
        shape = tuple(int(s) for s in x.shape)
        cdim = 1 if len(shape) >= 4 else max(len(shape) - 1, 1)
        sites.append(InputSite(0, param, "input", "input", (-1, *shape[1:]), cdim))
    for s in found.sites:
        s.extra.pop("scope", None)
    sites += found.sites
    for i, s in enumerate(sites):
        s.index = i
    return Observed(m, sites, found.finals, found.unreached)
