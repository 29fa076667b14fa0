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
from safetensors.torch import save_file
from torch import fx, nn

from . import passes  # noqa: F401  (importing the passes registers how to replay them)
from ._version import __version__
from .errors import SurgeonError
from .models.sources import build_model
from .record import FORMAT, FORMAT_VERSION, SurgeryRecord, replay
from .rundir import CODE_FILE, RECORD_FILE, WEIGHTS_FILE
from .rundir import follow_umask as follow_umask  # one umask rule for every file
from .rundir import write_json_atomic as write_json_atomic  # the one atomic JSON writer
from .trust import check_record, check_source, portable_spec


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
    if any(t.is_meta for t in state.values()):
        raise SurgeonError(
            "cannot save a model on the meta device: it has no weights",
            hint="build the model with real weights (not on device='meta') before saving",
        )
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
    follow_umask(path)  # safetensors creates its files 0600


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """Names of the state dict that are one tensor: by storage for real tensors, by object
    for a model on the meta device (whose tensors have no storage to compare)."""
    state = model.state_dict(keep_vars=True)
    if not any(t.is_meta for t in state.values()):
        return _alias_groups({k: v.detach() for k, v in state.items()})
    groups: dict[int, list[str]] = {}
    for name, t in state.items():
        groups.setdefault(id(t), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def read_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` from a safetensors file's header, without reading its data;
    one-line errors for a missing, truncated or garbled file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for name in f.keys():  # noqa: SIM118  (safe_open has no __iter__)
                sl = f.get_slice(name)
                out[name] = (str(sl.get_dtype()), tuple(int(d) for d in sl.get_shape()))
            return out
    except Exception as exc:  # SafetensorError derives from Exception; OSError for a missing file
        raise SurgeonError(
            f"{path} is not a readable safetensors file: {_first_line(exc)}",
            hint="the file is damaged or truncated; re-save the model",
        ) from None


def _read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, each in memory of its own: the file's own buffer
    is not aligned for every kernel (oneDNN picks other code paths for unaligned weights,
    which changes results in the last bits). One tensor at a time is copied, so memory stays
    the file's size plus its largest tensor."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118  (safe_open has no __iter__)
            out[name] = f.get_tensor(name).clone()
    return out


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__


def read_weights(
    model: nn.Module,
    path: str | Path,
    assign: bool = False,
    header: dict[str, tuple[str, tuple[int, ...]]] | None = None,
) -> None:
    """Load what :func:`write_weights` (or safetensors' ``save_model``) wrote into
    ``model``, strictly: every key of the model's state dict, nothing else, each of the
    shape the model expects (checked on the file's header before its data is read).
    ``assign`` replaces the model's tensors (a model built on the meta device)."""
    header = dict(header) if header is not None else read_header(path)
    own = model.state_dict(keep_vars=True)
    groups = _tied_groups(model)
    for names in groups:  # tied tensors are in the file under one of their names
        present = [n for n in names if n in header]
        for n in names:
            if n not in header and present:
                header[n] = header[present[0]]
    missing = sorted(set(own) - set(header))
    unexpected = sorted(set(header) - set(own))
    if missing or unexpected:
        raise SurgeonError(
            f"{path} does not fit the rebuilt model: {len(missing)} missing keys "
            f"({', '.join(missing[:3])}), {len(unexpected)} unexpected ({', '.join(unexpected[:3])})",
            hint="the weights were edited or saved by another model; re-save the model",
        )
    wrong = [n for n, t in own.items() if tuple(t.shape) != header[n][1]]
    if wrong:
        shown = ", ".join(
            f"{n} {list(header[n][1])} (expected {list(own[n].shape)})" for n in wrong[:3]
        )
        raise SurgeonError(
            f"{path} does not fit the rebuilt model: {len(wrong)} tensors of another shape: {shown}",
            hint="the record or the weights were edited; re-save the model",
        )
    try:
        state = _read_tensors(path)
    except Exception as exc:
        raise SurgeonError(
            f"{path} is not a readable safetensors file: {_first_line(exc)}",
            hint="the file is damaged or truncated; re-save the model",
        ) from None
    for names in groups:
        present = [n for n in names if n in state]
        for n in names:
            if n not in state and present:
                state[n] = state[present[0]]
    try:
        model.load_state_dict(state, strict=True, assign=assign)
    except (RuntimeError, ValueError) as exc:
        raise SurgeonError(
            f"{path} does not fit the rebuilt model: {_first_line(exc)}",
            hint="the weights were edited or saved by another model; re-save the model",
        ) from None
    if assign:  # assign makes one parameter per key: tie them again
        params = dict(model.named_parameters(remove_duplicate=False))
        for names in groups:
            for n in names[1:] if names[0] in params else ():
                parent, _, attr = n.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, attr, params[names[0]])


def write_model_files(
    model: nn.Module, folder: str | Path, extra: dict[str, Any] | None = None
) -> None:
    """Write ``surgery.json`` and ``model.safetensors`` into an existing folder, each atomically
    (a run folder holds its final model this way)."""
    folder = Path(folder)
    meta = _meta(record_of(model), training=False, folder=folder)
    meta.update(extra or {})
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{WEIGHTS_FILE}.", suffix=".tmp")
    os.close(fd)
    follow_umask(tmp)
    try:
        write_weights(model, tmp)
        os.replace(tmp, folder / WEIGHTS_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    write_json_atomic(folder / RECORD_FILE, meta)


def _meta(rec: SurgeryRecord, training: bool, folder: Path) -> dict[str, Any]:
    """What ``surgery.json`` in ``folder`` holds: the format, the versions, the record (a
    model file's path relative to the folder), the mode."""
    d = rec.to_dict()
    d["source"]["spec"] = portable_spec(d["source"]["spec"], folder)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": versions(),
        **d,
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
    follow_umask(tmp, folder=True)
    try:
        meta = _meta(rec, training=model.training, folder=folder)
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


def load(
    folder: str | Path, device: str | torch.device = "cpu", *, trust_code: bool = False
) -> nn.Module:
    """Rebuild a saved surgered model and load its weights strictly.

    The record is checked first (known passes, bounded sizes, the trust rules of
    :mod:`surgeon.trust`: a model defined by a ``.py`` file is built only with
    ``trust_code=True``), then the model is rebuilt on the meta device where it can be, so
    memory follows the weights file, and the weights' header is checked before its data.
    """
    folder = Path(folder)
    meta = read_meta(folder)
    rec = SurgeryRecord.from_dict(meta)
    _migrate(rec, meta)
    check_record(rec, folder)
    rec.source = check_source(rec, folder, trust_code)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise SurgeonError(f"{folder} has no {WEIGHTS_FILE}", hint="re-save the model")
    header = read_header(weights)  # a damaged file fails here, before anything is built
    model = _rebuild_on_meta(rec, set(header))
    if model is None:
        model = rebuild(rec)
        read_weights(model, weights, header=header)
    else:
        read_weights(model, weights, assign=True, header=header)
    model.to(device)
    model.train(bool(meta.get("training", False)))
    return model


def _migrate(rec: SurgeryRecord, meta: dict[str, Any]) -> None:
    """Records of fx-surgeon 0.1 rebuild what 0.1 built: its All-CNN-C had no final ReLU."""
    written_by = str((meta.get("versions") or {}).get("fx-surgeon", ""))
    if written_by.startswith("0.1.") and rec.source and rec.source.get("spec") == "allconv":
        rec.source["args"] = {"final_relu": False, **(rec.source.get("args") or {})}


def _rebuild_on_meta(rec: SurgeryRecord, saved: set[str]) -> nn.Module | None:
    """The model rebuilt with no memory for its weights, or None where that cannot work:
    the rebuild needs real tensors, a buffer outside the state dict (computed in
    ``__init__``, like timm's relative position indices) would stay empty, or the file
    stored a tied tensor once (ties between meta tensors cannot be seen)."""
    try:
        with torch.device("meta"):
            model = rebuild(rec)
    except Exception:  # an op without a meta kernel, a data-dependent eager run: for real
        return None
    persistent = set(model.state_dict())
    if any(b.is_meta and n not in persistent for n, b in model.named_buffers()):
        return None
    return model if persistent <= saved else None
