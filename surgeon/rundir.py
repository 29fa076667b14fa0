"""The run folder: its file names, and the readers and writers of its JSON and CSV files.

No torch here: the CLI, ``surgeon report`` and the training engine share these names. Tensors
(weights, momentum, snapshots) are written by their owners into the paths named below.
"""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import SurgeonError

# a saved model (``surgeon.save``; also the final model of a run)
RECORD_FILE = "surgery.json"
WEIGHTS_FILE = "model.safetensors"
CODE_FILE = "model_fx.py"
# a run
CONFIG_FILE = "config.json"  # the resolved TrainConfig (+ world_size)
DATA_FILE = "data.json"  # data source, classes, normalisation, split sizes
METRICS_FILE = "metrics.jsonl"  # one JSON row per line: type step, epoch or probe
SUMMARY_FILE = "summary.json"
SUMMARY_CSV = "summary.csv"
SNAPSHOTS_DIR = "snapshots"  # epoch_NNNN.safetensors: the shift/scale parameters
CHECKPOINTS_DIR = "checkpoints"  # step_NNNNNNNN/ folders and latest.json
LATEST_FILE = "latest.json"
OPTIM_FILE = "optim.safetensors"  # in a checkpoint: momentum and RNG states
STATE_FILE = "state.json"  # in a checkpoint: step, epoch, batch, accumulators
# a recipe folder: one run folder per grid point, and
RESULTS_FILE = "results.json"
RESULTS_CSV = "results.csv"

RUN_FILES = (METRICS_FILE, SUMMARY_FILE, CONFIG_FILE)  # any one makes a folder a run
SKIP_DIRS = {SNAPSHOTS_DIR, CHECKPOINTS_DIR}
SNAPSHOT_RE = re.compile(r"epoch_(\d+)\.safetensors$")
SUMMARY_FIELDS = (
    "name", "variant", "lr", "seed", "status", "final_val_err", "best_val_err", "best_epoch",
    "epochs_run", "steps", "diverged_at_step", "message",
)  # fmt: skip


def variant_name(norm: str, shift: str, scale: str) -> str:
    """``plain``, ``batchnorm``, ``shift-layer+scale-layer``, ``batchnorm+scale-channel``..."""
    parts = ["batchnorm"] if norm == "batchnorm" else []
    if shift != "none":
        parts.append(f"shift-{shift}")
    if scale != "none":
        parts.append(f"scale-{scale}")
    return "+".join(parts) or "plain"


def run_name(variant: str, lr: float, seed: int) -> str:
    """A run folder's default name: ``shift-layer+scale-layer_lr0.04_s0``."""
    return f"{variant}_lr{lr:g}_s{seed}"


def snapshot_path(run: Path, epoch: int) -> Path:
    return Path(run) / SNAPSHOTS_DIR / f"epoch_{epoch:04d}.safetensors"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def is_run_folder(folder: Path) -> bool:
    folder = Path(folder)
    return folder.is_dir() and any((folder / f).is_file() for f in RUN_FILES)


# ------------------------------------------------------------------------------ readers


def read_json(path: Path, what: str, error: type[SurgeonError] = SurgeonError) -> dict[str, Any]:
    """A JSON object from ``path``; a damaged file raises ``error`` naming ``what`` it is."""
    try:
        obj = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON ({exc})", hint=f"the {what} is damaged") from exc
    if not isinstance(obj, dict):
        raise error(f"{path} does not hold a JSON object", hint=f"the {what} is damaged")
    return obj


def read_record(folder: Path, error: type[SurgeonError] = SurgeonError) -> dict[str, Any]:
    """``surgery.json`` of a saved model or run, checked to be fx-surgeon's."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        raise error(
            f"{folder} is not a saved surgered model (no {RECORD_FILE})",
            hint="point at a folder written by `surgeon insert -o`, `surgeon train` or surgeon.save()",
        )
    rec = read_json(path, "saved model", error)
    if rec.get("format") != "fx-surgeon":
        raise error(
            f"{path} was not written by fx-surgeon",
            hint="point at a run folder or a folder written by `surgeon insert -o`",
        )
    return rec


def read_config(run: Path, error: type[SurgeonError] = SurgeonError) -> dict[str, Any]:
    """The run's ``config.json``, or ``{}`` if it has none."""
    path = Path(run) / CONFIG_FILE
    return read_json(path, "run config", error) if path.is_file() else {}


def read_summary(run: Path, error: type[SurgeonError] = SurgeonError) -> dict[str, Any] | None:
    """The run's ``summary.json``, or ``None`` while the run has not finished."""
    path = Path(run) / SUMMARY_FILE
    return read_json(path, "run summary", error) if path.is_file() else None


def read_metrics(path: Path) -> tuple[list[dict], list[dict], list[dict], list[str]]:
    """``(steps, epochs, probes, warnings)`` from ``metrics.jsonl`` (a run folder or the file);
    a damaged line (a run killed mid-write) is skipped with a warning."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    steps, epochs, probes, warnings = [], [], [], []
    if not path.is_file():
        return steps, epochs, probes, [f"{path.parent.name}: no {METRICS_FILE}"]
    bad = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if not isinstance(row, dict):
            bad += 1
            continue
        kind = row.get("type")
        if kind == "step":
            steps.append(row)
        elif kind == "epoch":
            epochs.append(row)
        elif kind == "probe":
            probes.append(row)
    if bad:
        warnings.append(f"{path}: skipped {bad} damaged line(s)")
    steps.sort(key=lambda r: r.get("step", 0))
    epochs.sort(key=lambda r: r.get("epoch", 0))
    return steps, epochs, probes, warnings


def list_snapshots(run: Path) -> list[tuple[int, Path]]:
    """``(epoch, file)`` of the run's per-epoch snapshots, by epoch (empty if none)."""
    folder = Path(run) / SNAPSHOTS_DIR
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = SNAPSHOT_RE.fullmatch(p.name)
        if m and p.is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(
    folder: Path, *, scan: bool = False, error: type[SurgeonError] = SurgeonError
) -> Path | None:
    """The checkpoint ``checkpoints/latest.json`` points at (complete by construction); with
    ``scan``, else the newest ``step_*`` folder that holds weights."""
    folder = Path(folder)
    pointer = folder / LATEST_FILE
    if pointer.is_file():
        name = read_json(pointer, "checkpoint pointer", error).get("checkpoint")
        if name and (folder / str(name) / WEIGHTS_FILE).is_file():
            return folder / str(name)
    if not scan:
        return None
    steps = sorted(p for p in folder.glob("step_*") if (p / WEIGHTS_FILE).is_file())
    return steps[-1] if steps else None


def experiment_name(folder: Path) -> str:
    """The recipe that wrote a recipe folder (its ``results.json``), else the folder's name."""
    results = Path(folder) / RESULTS_FILE
    if results.is_file():
        try:
            name = json.loads(results.read_text()).get("recipe")
            if name:
                return str(name)
        except (json.JSONDecodeError, AttributeError):
            pass
    return Path(folder).name


def _children(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name not in SKIP_DIRS
    )


def iter_runs(folder: Path) -> Iterator[tuple[Path, str]]:
    """``(run folder, experiment)`` under ``folder``: the runs of a recipe folder, or of a
    folder of recipe folders (``folder`` itself is not checked: see :func:`is_run_folder`)."""
    for sub in _children(Path(folder)):
        if is_run_folder(sub):
            yield sub, experiment_name(folder)
        else:
            yield from ((run, experiment_name(sub)) for run in _children(sub) if is_run_folder(run))


# ------------------------------------------------------------------------------ writers


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


def write_csv_atomic(path: Path, rows: Iterable[dict[str, Any]], fields: tuple[str, ...]) -> None:
    """Rows as CSV with the header ``fields`` (other keys ignored), replaced in one step."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in fields})
    tmp.replace(path)


def write_config(run: Path, config: dict[str, Any]) -> None:
    write_json_atomic(Path(run) / CONFIG_FILE, config)


def write_data_info(run: Path, info: dict[str, Any]) -> None:
    write_json_atomic(Path(run) / DATA_FILE, info)


def metrics_line(row: dict[str, Any]) -> str:
    return json.dumps(row) + "\n"


def append_metrics(run: Path, rows: Iterable[dict[str, Any]]) -> None:
    with open(Path(run) / METRICS_FILE, "a") as f:
        for row in rows:
            f.write(metrics_line(row))


def truncate_metrics(run: Path, step: int, epoch: int) -> None:
    """Drop metric rows written after ``step``/``epoch`` (a killed run may have logged more
    than its last checkpoint holds); a line torn by the kill goes too."""
    path = Path(run) / METRICS_FILE
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (row["type"] == "step" and row["step"] <= step) or (
            row["type"] != "step" and row["epoch"] <= epoch
        ):
            keep.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    tmp.replace(path)


def write_summary(run: Path, summary: dict[str, Any]) -> None:
    """``summary.json`` (every key) and ``summary.csv`` (the :data:`SUMMARY_FIELDS`)."""
    write_json_atomic(Path(run) / SUMMARY_FILE, summary)
    write_csv_atomic(Path(run) / SUMMARY_CSV, [summary], SUMMARY_FIELDS)


def write_results(folder: Path, recipe: str, results: list[dict[str, Any]]) -> None:
    """A recipe folder's ``results.json`` and ``results.csv``: every run's summary."""
    write_json_atomic(Path(folder) / RESULTS_FILE, {"recipe": recipe, "runs": results})
    write_csv_atomic(Path(folder) / RESULTS_CSV, results, SUMMARY_FIELDS)
