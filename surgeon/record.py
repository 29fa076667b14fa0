"""The surgery record: how a model was built and what each pass did to it.

Every pass reads the record of its input (:meth:`SurgeryRecord.of`), adds one
:class:`PassEntry` and its results, and attaches the new record to its output
(:func:`finish`). ``surgery.json`` is :meth:`SurgeryRecord.to_dict` plus the library
versions; :func:`surgeon.io.rebuild` builds the model from its spec and replays the passes,
each through the function it registered with :func:`register_pass`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from .errors import SurgeonError
from .sites import Site
from .tracing import set_preserved

FORMAT = "fx-surgeon"
FORMAT_VERSION = 1


@dataclass
class PassEntry:
    """One applied pass: its name and the options that replay it."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def traced_in(self) -> str:
        """``train`` or ``eval``: FX bakes ``if self.training:`` at trace time."""
        return self.options.get("traced_in", "train")

    @property
    def input_size(self) -> tuple[int, ...] | None:
        size = self.options.get("input_size")
        return tuple(size) if size else None

    def pick(self, *keys: str) -> dict[str, Any]:
        """The options among ``keys`` that the entry holds."""
        return {k: self.options[k] for k in keys if k in self.options}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **copy.deepcopy(self.options)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PassEntry:
        d = dict(d)
        return cls(str(d.pop("name")), d)


# results a pass may leave, in the order surgery.json lists them
_OPTIONAL = (
    "warnings", "method", "finals", "unreached", "batchnorm", "replace_norm", "fold", "traced_with",
)  # fmt: skip


@dataclass
class SurgeryRecord:
    """What a surgered model records about itself (``model.surgeon_record``)."""

    source: dict[str, Any] | None = None  # {"spec": ..., "args": {...}}: how to build the model
    passes: list[PassEntry] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)  # the last shift/scale pass's sites
    warnings: list[str] = field(default_factory=list)
    method: str | None = None  # fx, hybrid or eager: how the shift/scale pass reached its sites
    finals: list[dict] | None = None  # activations that are final (no site)
    unreached: list[dict] | None = None  # activation calls no site reaches, with reasons
    batchnorm: list[str] | None = None  # modules insert_batchnorm added
    replace_norm: dict | None = None  # {"replaced": [...], "skipped": [...]}
    fold: dict | None = None  # {"folded": [...], "scale_folded": [...], "kept": [...]}
    # {"example_inputs": [[2, 3, 224, 224]], "decisions": 9}: the graph was traced with an
    # example call (surgeon.example_tracing), its shape/dtype checks fixed at those inputs
    traced_with: dict | None = None

    @classmethod
    def of(cls, model: nn.Module) -> SurgeryRecord:
        """A copy of ``model``'s record, or a new one from how it was built."""
        rec = getattr(model, "surgeon_record", None)
        if rec is None:
            return cls(source=copy.deepcopy(getattr(model, "surgeon_source", None)))
        if isinstance(rec, dict):
            return cls.from_dict(rec)
        return copy.deepcopy(rec)

    def input_size(self) -> tuple[int, ...] | None:
        """The input size of the last pass that recorded one."""
        sizes = [p.input_size for p in self.passes if p.input_size]
        return sizes[-1] if sizes else None

    def inserted(self) -> list[str]:
        """Names of the shift/scale modules of the sites, in graph order."""
        return [s.module for s in self.sites if s.module]

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "source": copy.deepcopy(self.source),
            "passes": [p.to_dict() for p in self.passes],
            "sites": [s.to_dict() for s in self.sites],
        }
        for key in _OPTIONAL:
            value = getattr(self, key)
            if value is not None and not (key == "warnings" and not value):
                d[key] = copy.deepcopy(value)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SurgeryRecord:
        """Read a record (``surgery.json``'s content); one-line errors for a damaged one."""
        try:
            if not isinstance(d, dict):
                raise TypeError("not a JSON object")
            source = d.get("source")
            if source is not None and not (isinstance(source, dict) and "spec" in source):
                raise TypeError("'source' must be an object with a 'spec'")
            rec = cls(
                source=copy.deepcopy(source),
                passes=[PassEntry.from_dict(p) for p in d.get("passes", [])],
                sites=[Site.from_dict(s) for s in d.get("sites", [])],
                warnings=list(d.get("warnings", [])),
            )
            for key in _OPTIONAL[1:]:
                setattr(rec, key, copy.deepcopy(d.get(key)))
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise SurgeonError(
                f"damaged surgery record: {exc}", hint="re-save the model with fx-surgeon"
            ) from None
        return rec


def attach(model: nn.Module, record: SurgeryRecord) -> nn.Module:
    """Give ``model`` its record. On a GraphModule the record survives ``copy.deepcopy``
    (torch's preserved attributes); on any other module it is a plain attribute."""
    if isinstance(model, fx.GraphModule):
        set_preserved(model, "surgeon_record", record)
    else:
        model.surgeon_record = record
    return model


def mode_of(module: nn.Module) -> str:
    """``train`` or ``eval``: the mode a pass traces in, recorded as ``traced_in``."""
    return "train" if module.training else "eval"


def note_mode_dependence(gm: nn.Module, record: SurgeryRecord) -> None:
    """Warn when the traced graph baked a train/eval branch of the model into itself."""
    if getattr(gm, "surgeon_mode_dependent", False):
        mode = mode_of(gm)
        record.warn(
            f"the model branches on self.training outside leaf modules; the graph keeps {mode}-mode "
            "behaviour in both modes (make the branching module a leaf with --leaf, or insert "
            "in the mode the model will run in)"
        )


def finish(model: nn.Module, record: SurgeryRecord, training: bool) -> nn.Module:
    """Close a pass: check and regenerate the graph, attach the record, restore the mode."""
    if isinstance(model, fx.GraphModule):
        model.graph.lint()
        model.recompile()
        note_mode_dependence(model, record)
    attach(model, record)
    return model.train(training)


# ---------------------------------------------------------------- replaying the passes

Replay = Callable[[nn.Module, PassEntry], nn.Module]
PASSES: dict[str, Replay] = {}


def register_pass(name: str, replay: Replay) -> Callable:
    """Decorator: the pass ``name`` is replayed on load by ``replay(model, entry)``."""

    def deco(fn: Callable) -> Callable:
        PASSES[name] = replay
        return fn

    return deco


def replay(model: nn.Module, entry: PassEntry) -> nn.Module:
    """Apply the recorded pass ``entry`` again, in the train/eval mode it was traced in."""
    fn = PASSES.get(entry.name)
    if fn is None:
        raise SurgeonError(f"unknown pass {entry.name!r} in the record", hint="upgrade fx-surgeon")
    model.train(entry.traced_in == "train")
    return fn(model, entry)
