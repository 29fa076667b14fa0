"""Checkpoints: safetensors for tensors, JSON for the rest, an atomic ``latest.json`` pointer.

``checkpoints/step_00001234/`` holds ``model.safetensors`` (state dict), ``optim.safetensors``
(momentum buffers by parameter name, RNG states) and ``state.json`` (step, epoch, batch in
epoch, EMA, epoch accumulators, the run's config and its hash, each file's size and sha256,
and a sha256 of the state itself). A checkpoint is written into a hidden temp folder, each
file fsynced, the folder fsynced and renamed into place, then ``latest.json`` is replaced
atomically: a killed process leaves the previous checkpoint valid. Nothing is pickled.

Resuming checks a checkpoint before anything is loaded (:func:`check_checkpoint`) and falls
back to the newest intact one (:func:`find_checkpoint`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .. import rundir
from ..errors import TrainError
from ..rundir import follow_umask, fsync_dir, fsync_file, json_digest, write_json_atomic

KEEP = 2  # complete checkpoints kept on disk
FILES = (rundir.WEIGHTS_FILE, rundir.OPTIM_FILE)
HINT = "the checkpoint is damaged or was edited; resume from an older one or start a new run"
# state.json's keys; "run" holds RunState's fields (checked by the engine's RUN_FIELDS)
STATE_KEYS = {"run", "step", "config", "config_sha256", "files", "sha256"}


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}


def _save(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    save_file(tensors, str(path))
    follow_umask(path)  # safetensors creates its files 0600
    fsync_file(path)
    return {"bytes": path.stat().st_size, "sha256": rundir.sha256_file(path)}


def save_checkpoint(
    folder: Path, model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]
) -> Path:
    """Write checkpoint ``step_<step>`` under ``folder`` and point ``latest.json`` at it."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".step_*"):  # a write cut short by a killed process
        shutil.rmtree(stale, ignore_errors=True)
    name = rundir.checkpoint_name(state["step"])
    names = {id(p): n for n, p in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"momentum.{names[id(p)]}"] = buf.detach().contiguous().cpu().clone()
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{name}."))
    try:
        follow_umask(tmp, folder=True)
        files = {
            rundir.WEIGHTS_FILE: _save(_state_dict(model), tmp / rundir.WEIGHTS_FILE),
            rundir.OPTIM_FILE: _save(tensors, tmp / rundir.OPTIM_FILE),
        }
        full = {**state, "files": files}
        full["sha256"] = json_digest(full)
        write_json_atomic(tmp / rundir.STATE_FILE, full)  # fsyncs the file and tmp
        _slow_write_hook()
        final = folder / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json_atomic(folder / rundir.LATEST_FILE, {"checkpoint": name, "step": state["step"]})
    old = sorted(p for p in folder.glob("step_*") if p.is_dir() and p.name != name)
    for p in old[: max(len(old) - (KEEP - 1), 0)]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _slow_write_hook() -> None:
    """``SURGEON_SLOW_CHECKPOINT=SECONDS`` sleeps between a checkpoint's files and its rename
    (tests only: a process killed while a checkpoint is being written)."""
    delay = os.environ.get("SURGEON_SLOW_CHECKPOINT")
    if delay:
        import time

        time.sleep(float(delay))


def _bad(path: Path, what: str) -> TrainError:
    return TrainError(f"checkpoint file {path} {what}", hint=HINT)


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] if text else type(exc).__name__


def check_state(
    path: Path, run_fields: dict[str, tuple[type, ...]], added: Collection[str] = ()
) -> dict[str, Any]:
    """``state.json`` at ``path``, checked: a JSON object with the known keys, ``run`` with
    exactly ``run_fields`` (name -> allowed types; a field in ``added``, which this version
    added, may be missing from an older checkpoint), and its own sha256. Raises a one-line
    :class:`TrainError` naming the file and what is wrong."""
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise _bad(path, "is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"is not valid JSON ({_first_line(exc)})") from None
    if not isinstance(obj, dict):
        raise _bad(path, "does not hold a JSON object")
    unknown = sorted(set(obj) - STATE_KEYS)
    if unknown:
        raise _bad(path, f"has unknown key(s) {', '.join(map(repr, unknown))}")
    new_format = "files" in obj or "config" in obj or "sha256" in obj  # older: run and step
    needed = STATE_KEYS if new_format else {"run", "step"}
    missing = sorted(needed - set(obj))
    if missing:
        raise _bad(path, f"lacks key(s) {', '.join(map(repr, missing))}")
    run = obj["run"]
    if not isinstance(run, dict):
        raise _bad(path, "has a 'run' that is not an object")
    unknown = sorted(set(run) - set(run_fields))
    missing = sorted(set(run_fields) - set(run) - set(added))
    if unknown or missing:
        keys = [f"unknown run.{k}" for k in unknown] + [f"missing run.{k}" for k in missing]
        raise _bad(path, f"does not fit this version of the trainer: {', '.join(keys)}")
    for key, types in run_fields.items():
        if key not in run:  # an added field an older version did not write
            continue
        value = run[key]
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if ok and isinstance(value, list):
            ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        if ok and isinstance(value, int) and not isinstance(value, bool) and float not in types:
            ok = value >= 0
        if not ok:
            raise _bad(path, f"has a bad run.{key}: {json.dumps(value)[:60]}")
    if (
        not isinstance(obj["step"], int)
        or isinstance(obj["step"], bool)
        or obj["step"] != run["step"]
    ):
        raise _bad(path, f"has a step {json.dumps(obj['step'])[:60]} that is not run.step")
    if new_format:
        if obj["sha256"] != json_digest({k: v for k, v in obj.items() if k != "sha256"}):
            raise _bad(path, "does not match its sha256 (edited or damaged)")
        if not isinstance(obj["config"], dict) or obj["config_sha256"] != json_digest(
            obj["config"]
        ):
            raise _bad(path, "holds a config that does not match its hash")
        files = obj["files"]
        if not isinstance(files, dict) or set(files) != set(FILES):
            raise _bad(path, f"does not list the files {', '.join(FILES)}")
    return obj


def check_files(folder: Path, state: dict[str, Any]) -> None:
    """The checkpoint's safetensors files: present, of the recorded size and sha256 (when
    recorded), with a readable header."""
    for name in FILES:
        path = folder / name
        if not path.is_file():
            raise _bad(path, "is missing")
        recorded = state.get("files", {}).get(name)
        if recorded is not None:
            if not isinstance(recorded, dict) or path.stat().st_size != recorded.get("bytes"):
                raise _bad(
                    path,
                    f"has {path.stat().st_size} bytes, not the {recorded.get('bytes') if isinstance(recorded, dict) else '?'} recorded (truncated?)",
                )
            if rundir.sha256_file(path) != recorded.get("sha256"):
                raise _bad(path, "does not match its recorded sha256 (damaged)")
        try:
            with safe_open(str(path), framework="pt") as f:
                list(f.keys())
        except Exception as exc:  # SafetensorError derives from Exception
            raise _bad(path, f"is not a readable safetensors file ({_first_line(exc)})") from None


def check_checkpoint(
    folder: Path, run_fields: dict[str, tuple[type, ...]], added: Collection[str] = ()
) -> dict[str, Any]:
    """A checkpoint folder checked before anything is loaded from it: its ``state.json``."""
    state = check_state(folder / rundir.STATE_FILE, run_fields, added)
    check_files(folder, state)
    return state


@dataclass
class Found:
    """The checkpoint a resume takes, its checked state, and what was passed over."""

    path: Path
    state: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def notice(self) -> str | None:
        """One line saying which checkpoint was taken when it is not what latest.json named."""
        if not self.notes:
            return None
        return f"resuming from {self.path.name} (the newest intact checkpoint): {'; '.join(self.notes)}"


def find_checkpoint(
    folder: Path, run_fields: dict[str, tuple[type, ...]], added: Collection[str] = ()
) -> Found:
    """The newest intact checkpoint under ``folder`` (``latest.json`` names the newest
    complete one; a damaged one is passed over and noted). Raises a one-line
    :class:`TrainError` naming the damage when none is intact."""
    notes: list[str] = []
    pointer = folder / rundir.LATEST_FILE
    named = None
    if pointer.is_file():
        try:
            obj = json.loads(pointer.read_text())
            named = obj.get("checkpoint") if isinstance(obj, dict) else None
            if not isinstance(named, str) or not rundir.NAME_RE.fullmatch(named):
                notes.append(f"{pointer} names no checkpoint")
                named = None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            notes.append(f"{pointer} is not valid JSON ({_first_line(exc)})")
    elif folder.is_dir() and any(folder.glob("step_*")):
        notes.append(f"{pointer} is missing")
    candidates = sorted((p for p in folder.glob("step_*") if p.is_dir()), reverse=True)
    if named is not None and not (folder / named).is_dir():
        notes.append(f"{pointer} names {named}, which is missing")
    errors: list[TrainError] = []
    for path in candidates:
        try:
            state = check_checkpoint(path, run_fields, added)
        except TrainError as exc:
            errors.append(exc)
            notes.append(exc.message)
            continue
        if named is not None and path.name != named and not notes:
            newer = path.name > named
            notes.append(
                f"{pointer} names {named}, {'an older' if newer else 'a newer'} checkpoint"
            )
        return Found(path, state, notes)
    if errors:
        first = errors[0]
        more = (
            f" (and {len(errors) - 1} older checkpoint(s) are damaged too)"
            if len(errors) > 1
            else ""
        )
        raise TrainError(first.message + more, hint=HINT)
    raise TrainError(
        f"nothing to resume in {folder.parent}: no checkpoint",
        hint="start a new run without --resume",
    )


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimiser momentum and RNG states; return ``state.json`` (check it
    first with :func:`check_checkpoint`)."""
    weights = _load(path / rundir.WEIGHTS_FILE)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    wrong = [k for k in own if k in weights and weights[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise TrainError(
            f"checkpoint {path} does not match the model ({len(missing)} missing, "
            f"{len(unexpected)} unexpected keys, {len(wrong)} of another shape)",
            hint="resume with the same code and config that wrote it",
        )
    tensors = _load(path / rundir.OPTIM_FILE)
    params = dict(model.named_parameters())
    bad = [
        k
        for k, v in tensors.items()
        if k.startswith("momentum.")
        and (k[len("momentum.") :] not in params or v.shape != params[k[len("momentum.") :]].shape)
    ]
    if bad or "rng.cpu" not in tensors:
        raise _bad(path / rundir.OPTIM_FILE, "does not fit the model's parameters")
    model.load_state_dict(weights, strict=True)
    for key, buf in tensors.items():
        if key.startswith("momentum."):
            p = params[key[len("momentum.") :]]
            opt.state[p]["momentum_buffer"] = buf.to(p.device)
    try:
        torch.set_rng_state(tensors["rng.cpu"])
    except (RuntimeError, TypeError) as exc:
        raise _bad(
            path / rundir.OPTIM_FILE, f"holds a bad RNG state ({_first_line(exc)})"
        ) from None
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return json.loads((path / rundir.STATE_FILE).read_text())


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError derives from Exception
        raise _bad(path, f"is not a readable safetensors file ({_first_line(exc)})") from None
