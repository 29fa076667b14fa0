"""What a saved model may make fx-surgeon do: files from elsewhere are data.

- Code runs only when the user says so: a record whose model spec is a ``.py`` file is
  refused unless ``trust_code=True`` (CLI ``--trust-code``). A relative spec resolves
  against the model folder.
- Recorded constructor arguments are plain values, and none of them may load a file or
  download (``pretrained``, ``checkpoint_path``, ``pretrained_cfg_overlay``, ...).
- The record is checked before anything is built: known passes, modes, bounded input sizes,
  and the weights file's header is read (never its data) before the weights are loaded.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from .errors import SurgeonError
from .modes import MODES
from .record import PASSES, SurgeryRecord
from .rundir import RECORD_FILE

# an input of batch 2 at this many elements per sample is 128 MiB in fp32
MAX_INPUT_ELEMENTS = 16 * 1024 * 1024
MAX_INPUT_DIM = 16384
# argument names that load files, fetch weights or reach the network
_LOADING = re.compile(
    r"^(pretrained|weights)|checkpoint|cache|download|overlay|(^|_)(path|file|url|dir|hub)$", re.I
)


def is_code_spec(spec: str) -> bool:
    """A spec that names a Python file (``model.py`` or ``model.py:name``)."""
    return spec.endswith(".py") or ".py:" in spec


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return not (isinstance(value, float) and not math.isfinite(value))
    if isinstance(value, (list, tuple)):
        return len(value) <= 64 and all(_plain(v) for v in value)
    return False


def check_source(rec: SurgeryRecord, folder: Path, trust_code: bool) -> dict[str, Any]:
    """The ``{"spec", "args"}`` to build, after the trust rules; a one-line error otherwise."""
    src = rec.source
    where = folder / RECORD_FILE
    if src is None or not isinstance(src.get("spec"), str) or not src["spec"]:
        raise SurgeonError(
            f"{where} does not say how the model was built", hint="re-save the model"
        )
    spec, args = src["spec"], src.get("args") or {}
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise SurgeonError(f"{where}: source.args is not an object", hint="re-save the model")
    if is_code_spec(spec):
        file_part, sep, attr = spec.rpartition(":") if ".py:" in spec else (spec, "", "")
        path = Path(file_part)
        if not path.is_absolute():
            here = (folder / path).resolve()
            path = here if here.is_file() or not Path(file_part).is_file() else Path(file_part)
        if not trust_code:
            raise SurgeonError(
                f"{where} names model code {path}; loading it would run that file",
                hint="pass --trust-code (Python: trust_code=True) if you trust it",
            )
        spec = f"{path}{sep}{attr}" if sep else str(path)
    elif not trust_code:
        bad = sorted(k for k in args if _LOADING.search(k))
        if bad:
            raise SurgeonError(
                f"{where}: source.args asks for {', '.join(bad)}, which loads files or downloads",
                hint="pass --trust-code (Python: trust_code=True) to allow it",
            )
        odd = sorted(k for k, v in args.items() if not _plain(v))
        if odd:
            raise SurgeonError(
                f"{where}: source.args {', '.join(odd)} is not a plain value",
                hint="re-save the model",
            )
    return {"spec": spec, "args": dict(args)}


def _strings(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= 1024 and all(isinstance(s, str) for s in v)


# what each option of a recorded pass may hold
_OPTIONS = {
    "shift": lambda v: v in MODES,
    "scale": lambda v: v in MODES,
    "include": _strings,
    "exclude": _strings,
    "leaf": _strings,
    "fused": lambda v: isinstance(v, bool),
    "fallback": lambda v: v in ("auto", "eager", "never"),
    "traced_in": lambda v: v in ("train", "eval"),
    "method": lambda v: v in ("fx", "hybrid", "eager"),
    "final": lambda v: v in ("parametrised", "output"),
    "placement": lambda v: v in ("activations", "ssf"),
}
_REQUIRED = {"shift_scale": ("shift", "scale")}


def check_record(rec: SurgeryRecord, folder: Path) -> None:
    """Every pass known, its options of the right kind, input sizes bounded: before anything
    is built."""
    where = folder / RECORD_FILE
    for entry in rec.passes:
        if entry.name not in PASSES:
            raise SurgeonError(
                f"{where}: unknown pass {entry.name!r}", hint="upgrade fx-surgeon or re-save"
            )
        for key in _REQUIRED.get(entry.name, ()):
            if key not in entry.options:
                raise SurgeonError(
                    f"{where}: pass {entry.name} has no {key}", hint="re-save the model"
                )
        for key, ok in _OPTIONS.items():
            if key in entry.options and not ok(entry.options[key]):
                raise SurgeonError(
                    f"{where}: pass {entry.name} has an invalid {key} {entry.options[key]!r}",
                    hint="re-save the model",
                )
        size = entry.options.get("input_size")
        if size is None:
            continue
        ok = (
            isinstance(size, list)
            and 1 <= len(size) <= 4
            and all(isinstance(d, int) and not isinstance(d, bool) for d in size)
            and all(1 <= d <= MAX_INPUT_DIM for d in size)
            and math.prod(size) <= MAX_INPUT_ELEMENTS
        )
        if not ok:
            raise SurgeonError(
                f"{where}: pass {entry.name} records an input size {size!r} out of bounds",
                hint=f"at most 4 dims, each <= {MAX_INPUT_DIM}, "
                f"{MAX_INPUT_ELEMENTS:,} elements per sample",
            )


def portable_spec(spec: str, folder: Path) -> str:
    """A ``.py`` spec rewritten relative to the folder it is saved in (so the folder can be
    used from anywhere); other specs unchanged."""
    if not is_code_spec(spec):
        return spec
    file_part, sep, attr = spec.rpartition(":") if ".py:" in spec else (spec, "", "")
    path = Path(file_part).resolve()
    try:
        rel = Path(os.path.relpath(path, folder.resolve()))
    except ValueError:  # another drive
        rel = path
    return f"{rel}{sep}{attr}" if sep else str(rel)
