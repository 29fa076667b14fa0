"""Adapter files: the tensors a fine-tuning run trained, apart from the frozen base.

A folder holds ``adapter.safetensors`` (only the trained tensors: shift/scale, a head...),
and ``adapter.json``: the surgery record that rebuilds the model's structure, the names of
the stored tensors, and the base they were trained on (its spec and the sha256 of its
weights file). :func:`load_adapter` rebuilds the structure, loads the base weights from a
local safetensors file, checks its hash, and puts the adapter's tensors on top.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .errors import SurgeonError
from .io import (
    follow_umask,
    read_header,
    rebuild,
    record_of,
    versions,
    write_json_atomic,
)
from .io import (
    load as io_load,
)
from .record import SurgeryRecord
from .rundir import RECORD_FILE, WEIGHTS_FILE
from .trust import check_record, check_source, portable_spec

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_RECORD = "adapter.json"
FORMAT = "fx-surgeon-adapter"


def sha256_of(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def trained_names(model: nn.Module) -> list[str]:
    """State-dict names of the parameters that train (``requires_grad``)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def save_adapter(
    model: nn.Module,
    folder: str | Path,
    *,
    names: Iterable[str] | None = None,
    base_weights: str | Path | None = None,
) -> Path:
    """Write the tensors ``names`` (default: the parameters with ``requires_grad``) of
    ``model`` as an adapter; ``base_weights`` is the file the frozen weights came from (its
    sha256 is recorded; a load with another base is refused unless forced)."""
    folder = Path(folder)
    rec = record_of(model)
    state = model.state_dict()
    names = list(names) if names is not None else trained_names(model)
    missing = [n for n in names if n not in state]
    if missing or not names:
        raise SurgeonError(
            f"cannot save an adapter of {', '.join(missing[:3]) or 'no tensors'}",
            hint="name state-dict entries of the model (or train some parameters)",
        )
    base = {"spec": rec.source["spec"], "args": rec.source.get("args") or {}}
    if base_weights is not None:
        base["weights_sha256"] = sha256_of(base_weights)
    if folder.exists() and any(folder.iterdir()) and not (folder / ADAPTER_RECORD).exists():
        raise SurgeonError(
            f"refusing to write into {folder}: it exists and is not an adapter",
            hint="choose a new folder",
        )
    folder.mkdir(parents=True, exist_ok=True)
    d = rec.to_dict()
    d["source"]["spec"] = portable_spec(d["source"]["spec"], folder)
    meta = {
        "format": FORMAT,
        "format_version": 1,
        "versions": versions(),
        "tensors": names,
        "base": base,
        "record": d,
    }
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{ADAPTER_FILE}.", suffix=".tmp")
    os.close(fd)
    save_file({n: state[n].detach().contiguous().cpu() for n in names}, tmp)
    follow_umask(tmp)
    Path(tmp).replace(folder / ADAPTER_FILE)
    write_json_atomic(folder / ADAPTER_RECORD, meta)
    return folder


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_RECORD).is_file()


def read_adapter_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / ADAPTER_RECORD
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SurgeonError(f"{path} is not readable: {exc}", hint="re-save the adapter") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SurgeonError(f"{path} is not an fx-surgeon adapter", hint="re-save the adapter")
    if not isinstance(meta.get("tensors"), list) or not isinstance(meta.get("base"), dict):
        raise SurgeonError(f"{path} is damaged (tensors, base)", hint="re-save the adapter")
    return meta


def _base_file(base: str | Path) -> Path:
    path = Path(base)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise SurgeonError(
            f"no base weights at {base}",
            hint="give a .safetensors file or a folder with model.safetensors",
        )
    return path


def load_adapter(
    folder: str | Path,
    base: str | Path,
    *,
    force: bool = False,
    trust_code: bool = False,
) -> nn.Module:
    """The model an adapter was trained as: structure from its record, frozen weights from
    ``base`` (a safetensors file, or a folder holding ``model.safetensors``), the adapter's
    tensors on top. A base whose sha256 differs from the recorded one is refused unless
    ``force``."""
    folder = Path(folder)
    meta = read_adapter_meta(folder)
    rec = SurgeryRecord.from_dict(meta["record"])
    check_record(rec, folder)
    rec.source = check_source(rec, folder, trust_code)
    base_path = _base_file(base)
    want = meta["base"].get("weights_sha256")
    if want and not force:
        got = sha256_of(base_path)
        if got != want:
            raise SurgeonError(
                f"{base_path} is not the base this adapter was trained on "
                f"(sha256 {got[:12]}..., recorded {want[:12]}...)",
                hint="give the recorded base, or pass force=True (CLI: --force) to use it anyway",
            )
    adapter = folder / ADAPTER_FILE
    names = set(meta["tensors"])
    header = read_header(adapter)
    if set(header) != names:
        raise SurgeonError(
            f"{adapter} does not hold the tensors {folder / ADAPTER_RECORD} names",
            hint="re-save the adapter",
        )
    model = rebuild(rec)
    own = model.state_dict()
    base_header = read_header(base_path)
    needed = set(own) - names
    missing = sorted(needed - set(base_header))
    wrong = sorted(n for n in needed & set(base_header) if base_header[n][1] != tuple(own[n].shape))
    if missing or wrong:
        shown = ", ".join((missing + wrong)[:3])
        raise SurgeonError(
            f"{base_path} does not fit the adapter's model: {len(missing)} missing, "
            f"{len(wrong)} of another shape ({shown})",
            hint="give the base the adapter was trained on",
        )
    state = _tensors(base_path, needed) | _tensors(adapter, names)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


def _tensors(path: Path, names: set[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {n: f.get_tensor(n).clone() for n in names}


def load(
    folder: str | Path,
    device: str | torch.device = "cpu",
    *,
    trust_code: bool = False,
    base: str | Path | None = None,
    force: bool = False,
) -> nn.Module:
    """``surgeon.load``: a saved model (:func:`surgeon.io.load`), or an adapter folder with
    the ``base`` weights it was trained on (:func:`load_adapter`). A fine-tuning run's folder
    holds both: without ``base`` its complete model is loaded."""
    complete = (Path(folder) / RECORD_FILE).is_file() and (Path(folder) / WEIGHTS_FILE).is_file()
    if not is_adapter(folder) or (base is None and complete):
        return io_load(folder, device, trust_code=trust_code)  # a fine-tuning run: whole too
    if base is None:
        raise SurgeonError(
            f"{folder} is an adapter: it holds only the trained tensors",
            hint="give the base weights it was trained on (base=..., CLI --base)",
        )
    return load_adapter(folder, base, force=force, trust_code=trust_code).to(device)


__all__ = [
    "ADAPTER_FILE", "ADAPTER_RECORD", "is_adapter", "load", "load_adapter",
    "read_adapter_meta", "save_adapter", "sha256_of", "trained_names",
]  # fmt: skip
