"""``--init-from PATH``: the base model's weights from a local safetensors file.

PATH is a ``.safetensors`` file (a timm checkpoint, a run folder's ``model.safetensors``) or
a folder holding ``model.safetensors`` (a run folder, a folder ``surgeon insert -o`` wrote).
Next to a surgered model's file, ``surgery.json`` names the inserted modules, whose tensors
are skipped: the base is the model before surgery. Only safetensors are read (no pickle).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SurgeonError, TrainError
from ..io import read_header
from .parts import head_names

WEIGHTS, RECORD = "model.safetensors", "surgery.json"


def weights_file(path: str | Path) -> Path:
    """The safetensors file ``path`` names (a file, or a folder holding model.safetensors)."""
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS
    if not p.is_file():
        raise TrainError(
            f"--init-from {path}: no such file",
            hint="give a .safetensors file or a folder holding model.safetensors",
        )
    if p.suffix != ".safetensors":
        raise TrainError(
            f"--init-from {path} is not a .safetensors file",
            hint="convert the checkpoint to safetensors (pickled .pth/.bin files are not read)",
        )
    return p


def inserted_prefixes(weights: Path) -> list[str]:
    """The module names surgery inserted, from the ``surgery.json`` beside ``weights``."""
    record = weights.parent / RECORD
    if not record.is_file():
        return []
    try:
        d = json.loads(record.read_text())
    except (OSError, ValueError) as exc:
        raise TrainError(
            f"{record} is not readable JSON: {exc}", hint="re-save the model"
        ) from None
    names: list[Any] = []
    if isinstance(d, dict):
        names += [s.get("module") for s in d.get("sites") or [] if isinstance(s, dict)]
        names += list(d.get("batchnorm") or [])
    return [n for n in names if isinstance(n, str) and n]


def load_base_weights(base: nn.Module, path: str | Path) -> tuple[set[str], list[str]]:
    """Load ``path`` into ``base`` (the model before surgery), in place.

    Returns the state-dict names loaded from the file and notes for the run's output. A
    classifier whose shape differs (another class count) keeps its fresh init, with a
    note; any other missing, unexpected or misshapen tensor is a one-line error.
    """
    file = weights_file(path)
    try:
        header = read_header(file)
    except SurgeonError as exc:
        raise TrainError(exc.message, hint=exc.hint) from None
    skipped = inserted_prefixes(file)
    in_file = {k: v for k, v in header.items() if not any(k.startswith(p + ".") for p in skipped)}
    own = base.state_dict()
    heads = head_names(base)
    is_head = {k: any(k.startswith(h + ".") for h in heads) for k in own}
    missing = sorted(k for k in own if k not in in_file and not is_head[k])
    unexpected = sorted(k for k in in_file if k not in own)
    wrong = sorted(
        k for k in own if k in in_file and in_file[k][1] != tuple(own[k].shape) and not is_head[k]
    )
    if missing or unexpected or wrong:
        shown = [f"missing {k}" for k in missing[:3]] + [f"unexpected {k}" for k in unexpected[:3]]
        shown += [f"{k} {list(in_file[k][1])} vs {list(own[k].shape)}" for k in wrong[:3]]
        raise TrainError(
            f"--init-from {file} does not fit {type(base).__name__}: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(wrong)} of another shape ({'; '.join(shown[:4])})",
            hint="give the weights of the same model spec and --model-arg values",
        )
    fresh = sorted(
        k for k in own if is_head[k] and (k not in in_file or in_file[k][1] != tuple(own[k].shape))
    )
    loaded = {k for k in own if k in in_file and k not in fresh}
    from safetensors import safe_open

    with torch.no_grad(), safe_open(str(file), framework="pt") as f:
        for k in sorted(loaded):
            own[k].copy_(f.get_tensor(k).to(own[k].dtype))
    notes = [f"--init-from: {len(loaded)} tensors from {file}"]
    if skipped:
        notes[0] += f" ({len(skipped)} inserted modules of the file skipped)"
    if fresh:
        notes.append(
            f"classifier {', '.join(heads)} re-initialised (the file's has another shape): "
            + ", ".join(fresh)
        )
    return loaded, notes
