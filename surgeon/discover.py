"""The first step of every pass: a copy of the model, its shapes, and its sites.

torch.fx traces the copy (sites are graph nodes; activation modules inside leaves become
module-level sites, method ``hybrid``). A model FX cannot trace is run once and observed
instead (method ``eager``, :mod:`surgeon.eager`), as ``fallback`` allows.
"""

from __future__ import annotations

import copy
import functools
import gc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from . import eager, module_sites, shapes
from . import sites as sites_mod
from .errors import SurgeryError, TraceError
from .models.sources import default_input_size
from .record import SurgeryRecord
from .sites import Site
from .tracing import resolve_leaf_names, set_preserved, trace

FALLBACKS = ("auto", "eager", "never")  # when torch.fx cannot trace: eager if auto, always, never


@dataclass
class Analysis:
    """A copy of a model ready for surgery, and its sites in graph order."""

    model: nn.Module  # a traced GraphModule (fx, hybrid) or a copy of the model itself (eager)
    sites: list[Site]
    input_size: tuple[int, ...]
    leaf: list[str]
    method: str = "fx"  # fx | hybrid (module-level sites inside leaves) | eager
    finals: list[dict] = field(default_factory=list)  # activations that are final: no site
    unreached: list[dict] = field(default_factory=list)  # activation calls no site reaches
    fallback_reason: TraceError | None = None  # the tracer's error when ``auto`` fell back

    @property
    def gm(self) -> fx.GraphModule:
        """The traced copy; passes that edit the graph need it."""
        if not isinstance(self.model, fx.GraphModule):
            raise SurgeryError(
                "this pass needs a model torch.fx can trace", hint="see the tracer's error above"
            )
        return self.model


def gc_paused(fn):
    """Run ``fn`` with Python's cyclic garbage collector paused: tracing and shape
    propagation allocate objects in bursts, and each collection walks the whole model."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    return wrapper


def parse_input_size(input_size: Sequence[int] | str | None, model: nn.Module) -> tuple[int, ...]:
    """``(C, H, W)`` from a sequence or ``"3,32,32"``; by default the size the model's last
    pass recorded, else the model's own (timm's ``pretrained_cfg``, an ``input_size``)."""
    if input_size is None:
        recorded = SurgeryRecord.of(model).input_size()
        return recorded if recorded else default_input_size(model)
    if isinstance(input_size, str):
        try:  # "3,32,32" or "3x32x32"
            input_size = [int(s) for s in input_size.replace("x", ",").split(",")]
        except ValueError:
            raise SurgeryError(
                f"bad input size {input_size!r}", hint="write C,H,W, e.g. 3,32,32"
            ) from None
    size = tuple(int(s) for s in input_size)
    if not size or any(s <= 0 for s in size):
        raise SurgeryError(f"bad input size {size}", hint="write positive C,H,W, e.g. 3,32,32")
    return size


def check_fallback(fallback: str) -> None:
    if fallback not in FALLBACKS:
        raise SurgeryError(f"invalid fallback {fallback!r}", hint=f"choose {', '.join(FALLBACKS)}")


@gc_paused
def analyse(
    model: nn.Module,
    *,
    input_size: Sequence[int] | str | None = None,
    example_inputs: Sequence[torch.Tensor] | None = None,
    leaf: Iterable[str | type] = (),
    fallback: str = "never",
    inplace: bool = False,
    final: str = "parametrised",
    placement: str = "activations",
) -> Analysis:
    """Trace a copy of ``model``, propagate shapes and find its sites.

    ``fallback``: ``never`` raises the tracer's error for a model FX cannot trace; ``auto``
    observes an eager copy instead, unless that reaches no activation call; ``eager`` always
    observes. ``inplace`` works on ``model`` itself instead of a copy (no second copy of the
    weights; the caller gives the model up). ``final``: which activations get no site
    (:data:`surgeon.sites.FINAL_RULES`). ``placement``: which nodes are sites
    (:data:`surgeon.sites.PLACEMENTS`; ``ssf`` needs a graph: no fallback).
    """
    check_fallback(fallback)
    sites_mod.check_final_rule(final)
    if sites_mod.check_placement(placement) == "ssf":
        fallback = "never"
    leaf = list(leaf)
    types = [c for c in leaf if isinstance(c, type)]
    types += resolve_leaf_names(model, [c for c in leaf if isinstance(c, str)])
    names = [c if isinstance(c, str) else c.__name__ for c in leaf]
    size = parse_input_size(input_size, model)
    inputs = tuple(example_inputs) if example_inputs else shapes.example_inputs_for(size)
    why = None
    if fallback != "eager":
        try:
            return _analyse_graph(model, inputs, types, size, names, inplace, final, placement)
        except TraceError as exc:
            if fallback == "never":
                raise
            why = exc
    seen = eager.analyse_eager(model, inputs, types, copy_model=not inplace, final=final)
    a = Analysis(seen.model, seen.sites, size, names, "eager", seen.finals, seen.unreached, why)
    if why is not None:
        _check_reaches(a, why)
    return a


def _analyse_graph(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    leaf_types: list[type],
    size: tuple[int, ...],
    names: list[str],
    inplace: bool,
    final: str,
    placement: str = "activations",
) -> Analysis:
    gm = trace(
        model, leaf_types, copy_model=not inplace, n_inputs=len(inputs), compile=False,
        example_inputs=inputs,
    )  # fmt: skip
    if getattr(model, "surgeon_source", None) is not None:
        set_preserved(gm, "surgeon_source", copy.deepcopy(model.surgeon_source))
    if placement == "ssf":  # layers of the graph only; activations are not the question
        shapes.propagate(gm, inputs)
        sites = sites_mod.discover(gm, final, placement)
        return Analysis(gm, sites, size, names, "fx")
    found = module_sites.propagate_with_leaves(gm, inputs, leaf_types, final)
    graph_sites = sites_mod.discover(gm, final)
    finals, unreached = module_sites.graph_leftovers(gm, graph_sites, final)
    sites = module_sites.merge(gm, graph_sites, found)
    method = "hybrid" if found.sites else "fx"
    return Analysis(
        gm, sites, size, names, method, finals + found.finals, unreached + found.unreached
    )


def _check_reaches(a: Analysis, exc: TraceError) -> None:
    """The automatic fallback is worth taking only if it reaches an activation call;
    otherwise the tracer's error (and its hint) is the useful answer."""
    if any(s.kind != "input" for s in a.sites) or not a.unreached:
        return
    calls = sum(u["calls"] for u in a.unreached)
    raise TraceError(
        f"{exc.message} (the module-level fallback reaches none of its {calls} activation calls)",
        hint="mark the module that does data-dependent control flow as a leaf with --leaf "
        "ClassName (module-level insertion cannot reach activation functions)",
    ) from exc
