"""Loading what ``inspect-params`` analyses: run folders, saved models, checkpoints, snapshots.

Nothing is unpickled and no model code runs: a target is ``surgery.json`` (its sites and
modes) plus the shift/scale tensors read with ``safetensors``. A target can be

- a run folder (``config.json`` + ``surgery.json`` + ``model.safetensors`` + ``snapshots/``),
- a saved surgered model folder (``surgery.json`` + ``model.safetensors``),
- a checkpoint folder of a run (``RUN/checkpoints/step_*/``, or ``RUN/checkpoints`` for the
  latest one),
- one ``.safetensors`` file (a snapshot ``RUN/snapshots/epoch_0003.safetensors``, or a
  checkpoint's weights), read with the record of the run or model folder above it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .. import rundir
from ..errors import AnalysisError
from ..rundir import RECORD_FILE, SNAPSHOT_RE, WEIGHTS_FILE, list_snapshots, variant_name

PARAMS = ("shift", "scale")


@dataclass
class Target:
    """One set of shift/scale values and the surgery record that explains them."""

    path: Path  # what the user named
    kind: str  # run | model | checkpoint | snapshot
    label: str
    record: dict[str, Any]  # surgery.json
    weights: Path  # the .safetensors file the values come from
    tensors: dict[str, torch.Tensor]  # "<module>.shift" / "<module>.scale", fp32
    run_dir: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)
    epoch: int | None = None

    @property
    def sites(self) -> list[dict[str, Any]]:
        """The record's sites that received a shift/scale module, in depth order."""
        return [s for s in self.record.get("sites", []) if s.get("module")]

    @property
    def modes(self) -> dict[str, str]:
        """``{"shift": mode, "scale": mode}`` of the (last) shift/scale pass."""
        for p in reversed(self.record.get("passes", [])):
            if p.get("name") == "shift_scale":
                return {"shift": p.get("shift", "none"), "scale": p.get("scale", "none")}
        return {"shift": "none", "scale": "none"}

    @property
    def variant(self) -> str:
        if self.config.get("variant"):
            return str(self.config["variant"])
        batchnorm = any(p.get("name") == "batchnorm" for p in self.record.get("passes", []))
        norm = "batchnorm" if batchnorm else "none"
        return variant_name(norm, self.modes["shift"], self.modes["scale"])

    @property
    def model_id(self) -> str:
        """The model spec and constructor arguments, as a canonical JSON string."""
        src = self.record.get("source") or {}
        return json.dumps({"spec": src.get("spec"), "args": src.get("args") or {}}, sort_keys=True)

    @property
    def model_spec(self) -> str:
        return str((self.record.get("source") or {}).get("spec"))

    @property
    def seed(self) -> int | None:
        return self.config.get("seed")

    @property
    def lr(self) -> float | None:
        return self.config.get("lr")

    def param(self, site: dict[str, Any], name: str) -> torch.Tensor | None:
        """The ``shift`` or ``scale`` tensor of ``site`` (``None`` when its mode is none)."""
        return self.tensors.get(f"{site['module']}.{name}")

    def snapshots(self) -> list[tuple[int, Path]]:
        """``(epoch, file)`` of the run's per-epoch snapshots, by epoch (empty if none)."""
        return list_snapshots(self.run_dir) if self.run_dir is not None else []

    def describe(self) -> dict[str, Any]:
        """The target's entry in the JSON output."""
        return {
            "label": self.label,
            "path": str(self.path),
            "kind": self.kind,
            "model": self.model_spec,
            "variant": self.variant,
            "shift_mode": self.modes["shift"],
            "scale_mode": self.modes["scale"],
            "lr": self.lr,
            "seed": self.seed,
            "epoch": self.epoch,
            "n_sites": len(self.sites),
        }


def _owner(path: Path, levels: int = 3) -> Path | None:
    """The nearest folder at or above ``path`` (up to ``levels`` up) holding ``surgery.json``."""
    p = path if path.is_dir() else path.parent
    for _ in range(levels + 1):
        if (p / RECORD_FILE).is_file():
            return p
        if p.parent == p:
            break
        p = p.parent
    return None


def read_params(weights: Path, sites: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Read only the shift/scale tensors of ``sites`` from ``weights`` (no pickle).

    Keys are ``<module>.shift`` / ``<module>.scale``; a file whose keys carry a prefix
    (``module.``, ``_orig_mod.``) is matched by unique suffix.
    """
    try:
        with safe_open(str(weights), framework="pt") as f:
            keys = list(f.keys())
            by_suffix: dict[str, list[str]] = {}
            for k in keys:
                parts = k.split(".")
                if len(parts) >= 2:
                    by_suffix.setdefault(".".join(parts[-2:]), []).append(k)
            out = {}
            for site in sites:
                for name in PARAMS:
                    key = f"{site['module']}.{name}"
                    found = key if key in keys else None
                    if found is None and len(by_suffix.get(key, [])) == 1:
                        found = by_suffix[key][0]
                    if found is not None:
                        out[key] = f.get_tensor(found).float()
    except Exception as exc:  # safetensors' SafetensorError, OSError...
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AnalysisError(
            f"cannot read {weights}: {text}", hint="is it a complete .safetensors file?"
        ) from exc
    return out


def _check_params(target: Target) -> None:
    modes = target.modes
    if any(s.get("folded_into") or s.get("scale_folded_into") for s in target.sites):
        raise AnalysisError(
            f"{target.weights} is a folded model: its shift/scale values were merged into the weights",
            hint="inspect the surgered model or run saved before `surgeon fold`",
        )
    for site in target.sites:
        for name in PARAMS:
            if modes[name] != "none" and f"{site['module']}.{name}" not in target.tensors:
                raise AnalysisError(
                    f"{target.weights} has no tensor {site['module']}.{name}",
                    hint="the weights do not belong to this surgery record; point at the folder that wrote them",
                )


def load_target(path: str | Path) -> Target:
    """Load one target (see the module docstring for what a target can be)."""
    path = Path(path)
    if not path.exists():
        raise AnalysisError(
            f"target {path} does not exist",
            hint="pass a run folder, a saved model folder, a checkpoint or a snapshot .safetensors",
        )
    kind, epoch = "model", None
    if path.is_dir() and (path / RECORD_FILE).is_file():
        owner, weights = path, path / WEIGHTS_FILE
        kind = "run" if rundir.is_run_folder(path) else "model"
    elif path.is_dir():
        ckpt = (
            path
            if (path / WEIGHTS_FILE).is_file()
            else rundir.latest_checkpoint(path, scan=True, error=AnalysisError)
        )
        owner = _owner(path)
        if ckpt is None or owner is None:
            raise AnalysisError(
                f"{path} is not a run, a saved model or a checkpoint (no {RECORD_FILE})",
                hint="pass a run folder, a folder written by `surgeon insert -o`, or a checkpoint of a run",
            )
        kind, weights = "checkpoint", ckpt / WEIGHTS_FILE
    elif path.suffix == ".safetensors":
        owner, weights = _owner(path), path
        if owner is None:
            raise AnalysisError(
                f"no {RECORD_FILE} found above {path}",
                hint="a single .safetensors file is read with the record of the run it belongs to; keep it inside its run folder",
            )
        m = SNAPSHOT_RE.fullmatch(path.name)
        if m and path.parent.name == rundir.SNAPSHOTS_DIR:
            kind, epoch = "snapshot", int(m.group(1))
        elif path.resolve() != (owner / WEIGHTS_FILE).resolve():
            kind = "checkpoint"
    else:
        raise AnalysisError(
            f"{path} is not a folder or a .safetensors file",
            hint="pass a run folder, a saved model folder, a checkpoint or a snapshot .safetensors",
        )
    if not weights.is_file():
        raise AnalysisError(f"{owner} has no {WEIGHTS_FILE}", hint="the run or save did not finish")
    record = rundir.read_record(owner, AnalysisError)
    config = rundir.read_config(owner, AnalysisError)
    run_dir = owner if (config or (owner / rundir.SNAPSHOTS_DIR).is_dir()) else None
    if kind == "model" and run_dir is not None:
        kind = "run"
    base = str(config.get("name") or owner.name)
    label = {
        "snapshot": f"{base}@epoch{epoch}",
        "checkpoint": f"{base}:{weights.parent.name if weights.name == WEIGHTS_FILE else weights.stem}",
    }.get(kind, base)
    target = Target(path, kind, label, record, weights, {}, run_dir, config, epoch)
    if record.get("fold"):
        raise AnalysisError(
            f"{path} is a folded model: its shift/scale values were merged into the weights",
            hint="inspect the surgered model or run saved before `surgeon fold`",
        )
    if not target.sites:
        raise AnalysisError(
            f"{path} has no shift/scale sites ({target.variant})",
            hint="inspect a model or run that has shift/scale layers (not plain or batchnorm only)",
        )
    target.tensors = read_params(weights, target.sites)
    _check_params(target)
    return target


def load_targets(paths: list[str | Path]) -> list[Target]:
    """Load several targets, giving them unique labels."""
    if not paths:
        raise AnalysisError("no target given", hint="pass at least one run folder or saved model")
    targets = [load_target(p) for p in paths]
    labels = [t.label for t in targets]
    for t in targets:
        if labels.count(t.label) > 1:
            t.label = f"{Path(t.run_dir or t.path).resolve().parent.name}/{t.label}"
    seen: dict[str, int] = {}
    for t in targets:
        n = seen.get(t.label, 0)
        seen[t.label] = n + 1
        if n:
            t.label = f"{t.label}#{n + 1}"
    return targets
