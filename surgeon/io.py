"""Saving and loading surgered models: ``surgery.json`` + ``model.safetensors``, no pickle.

A folder records how to rebuild the model (its spec and arguments), the passes applied to
it, the sites and the library versions; :func:`load` rebuilds the model from its spec,
replays the passes and loads the weights strictly.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import fx, nn

from . import passes  # noqa: F401  (importing the passes registers how to replay them)
from ._version import __version__
from .errors import SurgeonError
from .models.sources import build_model
from .record import FORMAT, FORMAT_VERSION, SurgeryRecord, replay
from .rundir import CODE_FILE, RECORD_FILE, WEIGHTS_FILE


def versions() -> dict[str, str]:
    """The versions of torch, torchvision, timm (if installed) and fx-surgeon."""
    out = {"torch": torch.__version__}
    for name in ("torchvision", "timm"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    out["fx-surgeon"] = __version__
    return out


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON via a temp file in the same folder, fsync, then ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record_of(model: nn.Module) -> SurgeryRecord:
    """The model's record; an error if it does not say how the model was built."""
    rec = SurgeryRecord.of(model)
    if rec.source is None:
        raise SurgeonError(
            "cannot save: the model does not say how it was built",
            hint="build it with surgeon.build_model(spec) before surgery, or set model.surgeon_source",
        )
    return rec


def _alias_groups(state: dict[str, torch.Tensor]) -> list[list[str]]:
    """Names of the state dict that are the same tensor (tied weights), in order."""
    groups: dict[tuple, list[str]] = {}
    for name, t in state.items():
        key = (
            t.device, t.untyped_storage().data_ptr(), t.storage_offset(),
            tuple(t.shape), tuple(t.stride()), t.dtype,
        )  # fmt: skip
        groups.setdefault(key, []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def write_weights(model: nn.Module, path: str | Path) -> None:
    """``model.state_dict()`` as safetensors: a tied tensor once (under its first name; the
    model rebuilt on load ties the others), views and non-contiguous buffers as contiguous
    copies (safetensors' own ``save_model`` fails on those: eva02's rotary buffers). The
    metadata is one fixed entry, so the same weights give the same bytes."""
    state = model.state_dict()
    aliases = {dup: names[0] for names in _alias_groups(state) for dup in names[1:]}
    kept = {k: v.detach() for k, v in state.items() if k not in aliases}
    ptrs: dict[int, int] = {}
    for t in kept.values():
        ptr = t.untyped_storage().data_ptr()
        ptrs[ptr] = ptrs.get(ptr, 0) + 1
    tensors = {
        k: t.cpu() if t.is_contiguous() and ptrs[t.untyped_storage().data_ptr()] == 1
        else t.contiguous().clone().cpu()
        for k, t in kept.items()
    }  # fmt: skip
    save_file(tensors, str(path), metadata={"format": "pt"})


def read_weights(model: nn.Module, path: str | Path) -> None:
    """Load what :func:`write_weights` (or safetensors' ``save_model``) wrote into
    ``model``, strictly: every key of the model's state dict, nothing else."""
    state = load_file(str(path))
    own = model.state_dict()
    for names in _alias_groups(own):  # tied tensors are in the file under one of their names
        present = [n for n in names if n in state]
        for n in names:
            if n not in state and present:
                state[n] = state[present[0]]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise RuntimeError(
            f"{len(missing)} missing keys ({', '.join(missing[:3])}), "
            f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])})"
        )
    model.load_state_dict(state, strict=True)


def write_model_files(
    model: nn.Module, folder: str | Path, extra: dict[str, Any] | None = None
) -> None:
    """Write ``surgery.json`` and ``model.safetensors`` into an existing folder, each atomically
    (a run folder holds its final model this way)."""
    folder = Path(folder)
    meta = _meta(record_of(model), training=False)
    meta.update(extra or {})
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{WEIGHTS_FILE}.", suffix=".tmp")
    os.close(fd)
    try:
        write_weights(model, tmp)
        os.replace(tmp, folder / WEIGHTS_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    write_json_atomic(folder / RECORD_FILE, meta)


def _meta(rec: SurgeryRecord, training: bool) -> dict[str, Any]:
    """What ``surgery.json`` holds: the format, the versions, the record, the mode."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": versions(),
        **rec.to_dict(),
        "training": training,
    }


def save(model: nn.Module, folder: str | Path) -> Path:
    """Write ``surgery.json``, ``model.safetensors`` and ``model_fx.py`` into ``folder``.

    The folder is written next to its final place and moved there at the end, so a failure
    leaves nothing half-written. An existing folder is replaced only if it holds a saved
    model (``surgery.json``).
    """
    folder = Path(folder)
    rec = record_of(model)
    _check_replaceable(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        meta = _meta(rec, training=model.training)
        write_json_atomic(tmp / RECORD_FILE, meta)
        write_weights(model, tmp / WEIGHTS_FILE)
        if isinstance(model, fx.GraphModule):
            (tmp / CODE_FILE).write_text(model.code)
        _move_into_place(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


SAVED_FILES = (RECORD_FILE, WEIGHTS_FILE, CODE_FILE)


def _check_replaceable(folder: Path) -> None:
    """A target folder must be new, empty, or a saved model and nothing else."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise SurgeonError(
            f"refusing to write into {folder}: it is a file", hint="choose a new folder with -o"
        )
    names = {p.name for p in folder.iterdir()}
    if names and (RECORD_FILE not in names or not names <= set(SAVED_FILES)):
        raise SurgeonError(
            f"refusing to write into {folder}: it exists and is not a saved model",
            hint="choose an empty or new folder with -o",
        )


def _move_into_place(tmp: Path, folder: Path) -> None:
    """Move the finished folder ``tmp`` to ``folder``; an old saved model there is moved
    aside first and deleted only once the new one is in place."""
    if not folder.exists() or not any(folder.iterdir()):
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
        return
    old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old."))
    old.rmdir()
    os.replace(folder, old)
    try:
        os.replace(tmp, folder)
    except BaseException:
        os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_meta(folder: str | Path) -> dict[str, Any]:
    """The content of a saved model's ``surgery.json``, checked to be fx-surgeon's."""
    folder = Path(folder)
    path = folder / RECORD_FILE
    if not path.is_file():
        raise SurgeonError(
            f"{folder} is not a saved surgered model (no {RECORD_FILE})",
            hint="point at a folder written by `surgeon insert -o` or surgeon.save()",
        )
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SurgeonError(f"{path} is not valid JSON: {exc}", hint="re-save the model") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SurgeonError(f"{path} was not written by fx-surgeon", hint="re-save the model")
    return meta


def read_record(folder: str | Path) -> SurgeryRecord:
    """The surgery record of a saved model."""
    return SurgeryRecord.from_dict(read_meta(folder))


def rebuild(rec: SurgeryRecord | dict[str, Any]) -> nn.Module:
    """Build the model from its spec and replay the recorded passes (weights at init)."""
    if not isinstance(rec, SurgeryRecord):
        rec = SurgeryRecord.from_dict(rec)
    if rec.source is None:
        raise SurgeonError(
            "the record does not say how the model was built", hint="re-save the model"
        )
    model: nn.Module = build_model(rec.source["spec"], rec.source.get("args") or {})
    for entry in rec.passes:
        model = replay(model, entry)
    return model


def load(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a saved surgered model and load its weights strictly."""
    folder = Path(folder)
    meta = read_meta(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise SurgeonError(f"{folder} has no {WEIGHTS_FILE}", hint="re-save the model")
    model = rebuild(SurgeryRecord.from_dict(meta))
    try:
        read_weights(model, weights)
    except (RuntimeError, OSError, ValueError) as exc:  # safetensors' key/shape/format errors
        text = str(exc).strip()
        reason = " ".join(text.split())[:300] if text else type(exc).__name__
        raise SurgeonError(
            f"{weights} does not fit the rebuilt model: {reason}",
            hint="the weights were edited or saved by another model; re-save the model",
        ) from exc
    model.to(device)
    model.train(bool(meta.get("training", False)))
    return model
