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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import AnalysisError

RECORD_FILE = "surgery.json"
WEIGHTS_FILE = "model.safetensors"
SNAPSHOT_RE = re.compile(r"epoch_(\d+)\.safetensors$")
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
        return variant_name(batchnorm, self.modes["shift"], self.modes["scale"])

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


def variant_name(batchnorm: bool, shift: str, scale: str) -> str:
    """``plain``, ``batchnorm``, ``shift-layer+scale-layer``... (as ``surgeon train`` names them)."""
    parts = ["batchnorm"] if batchnorm else []
    parts += [f"{p}-{m}" for p, m in (("shift", shift), ("scale", scale)) if m != "none"]
    return "+".join(parts) or "plain"


def list_snapshots(run_dir: Path) -> list[tuple[int, Path]]:
    folder = Path(run_dir) / "snapshots"
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = SNAPSHOT_RE.fullmatch(p.name)
        if m and p.is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise AnalysisError(
            f"{path} is not valid JSON ({exc})", hint=f"the {what} is damaged"
        ) from exc
    if not isinstance(obj, dict):
        raise AnalysisError(f"{path} does not hold a JSON object", hint=f"the {what} is damaged")
    return obj


def _read_record(folder: Path) -> dict[str, Any]:
    rec = read_json(folder / RECORD_FILE, "saved model")
    if rec.get("format") != "fx-surgeon":
        raise AnalysisError(
            f"{folder / RECORD_FILE} was not written by fx-surgeon",
            hint="point at a run folder or a folder written by `surgeon insert -o`",
        )
    return rec


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


def _latest_checkpoint(folder: Path) -> Path | None:
    pointer = folder / "latest.json"
    if pointer.is_file():
        name = read_json(pointer, "checkpoint pointer").get("checkpoint")
        if name and (folder / str(name) / WEIGHTS_FILE).is_file():
            return folder / str(name)
    steps = sorted(p for p in folder.glob("step_*") if (p / WEIGHTS_FILE).is_file())
    return steps[-1] if steps else None


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
        is_run = (path / "config.json").is_file() or (path / "metrics.jsonl").is_file()
        kind = "run" if is_run else "model"
    elif path.is_dir():
        ckpt = path if (path / WEIGHTS_FILE).is_file() else _latest_checkpoint(path)
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
        if m and path.parent.name == "snapshots":
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
    record = _read_record(owner)
    config = (
        read_json(owner / "config.json", "run config") if (owner / "config.json").is_file() else {}
    )
    run_dir = owner if (config or (owner / "snapshots").is_dir()) else None
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
