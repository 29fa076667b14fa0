"""Site recall: do the sites of a surgered model match the activation calls the eager
model really makes?

:func:`count_activation_calls` runs one forward of the original model with a
``TorchFunctionMode`` plus hooks on the registered activation modules, so that module,
function (``F.gelu``) and method (``x.relu()``) forms all show up; a module's own inner
calls count once, as the module. :func:`compare` matches those counts, per target, against
the record of :func:`surgeon.insert`: its sites, its final activations and the calls it
lists as unreached, and gives a reason for every difference. ``benchmarks/zoo.py`` runs
this over every timm and torchvision model.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from . import registry
from .observer import activation_target
from .sites import describe

FINAL_REASON = "final (reaches the output without a parametrised layer)"


def target_key(target: str) -> str:
    """The runtime name of a site's target: ``x*sigmoid(x)`` (SiLU written out) is one
    ``sigmoid`` call."""
    m = re.fullmatch(r"x\*(.+)\(x\)", target)
    return m.group(1) if m else target


class _Mode(TorchFunctionMode):
    def __init__(self, counter: _Calls) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        c = self.counter
        if not c.depth:
            target = activation_target(func)
            if target is not None:
                c.events[target] += 1
        return out


class _Calls:
    def __init__(self) -> None:
        self.events: Counter[str] = Counter()
        self.depth = 0

    def pre(self, target: str):
        def hook(module, args):
            if not self.depth:
                self.events[target] += 1
            self.depth += 1

        return hook

    def post(self, module, args, out):
        self.depth -= 1


def count_activation_calls(model: nn.Module, *inputs: Any) -> Counter[str]:
    """The activation calls of one ``model(*inputs)`` (no grad), by target name."""
    calls = _Calls()
    handles = []
    try:
        for m in model.modules():
            if registry.lookup_module(m) is None:
                continue
            handles.append(m.register_forward_pre_hook(calls.pre(describe(type(m)))))
            handles.append(m.register_forward_hook(calls.post, always_call=True))
        with torch.no_grad(), _Mode(calls):
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return calls.events


@dataclass
class Coverage:
    """Sites against runtime calls, per target."""

    runtime: Counter[str]
    found: Counter[str]
    covered: int  # runtime calls that got a site
    reasons: Counter[str] = field(default_factory=Counter)  # reason -> calls

    @property
    def total(self) -> int:
        return sum(self.runtime.values())

    @property
    def recall(self) -> float:
        return self.covered / self.total if self.total else 1.0

    @property
    def explained(self) -> bool:
        """Every runtime call is a site, a final activation or a listed unreached call."""
        return self.runtime == self.found

    @property
    def unexplained(self) -> dict[str, int]:
        keys = set(self.runtime) | set(self.found)
        return {
            k: self.runtime[k] - self.found[k]
            for k in sorted(keys)
            if self.runtime[k] != self.found[k]
        }


def compare(record: Mapping[str, Any], runtime: Counter[str]) -> Coverage:
    """Match ``runtime`` (from :func:`count_activation_calls`) against a surgery record."""
    sites = [s for s in record["sites"] if s["kind"] != "input"]
    found: Counter[str] = Counter()
    for s in sites:
        found[target_key(s["target"])] += s.get("extra", {}).get("calls", 1)
    for f in record.get("finals", []):
        found[target_key(f["target"])] += f["calls"]
    for u in record.get("unreached", []):
        found[target_key(u["target"])] += u["calls"]
    covered = sum(s.get("extra", {}).get("calls", 1) for s in sites)
    reasons: Counter[str] = Counter()
    finals = sum(f["calls"] for f in record.get("finals", []))
    if finals:
        reasons[FINAL_REASON] += finals
    for u in record.get("unreached", []):
        reasons[re.sub(r" \([^)]*\)", "", u["reason"])] += u["calls"]
    cov = Coverage(runtime, found, covered, reasons)
    for key, d in cov.unexplained.items():
        reasons[f"UNEXPLAINED {key}: {runtime[key]} calls at run time, {found[key]} found"] += abs(
            d
        )
    return cov
