"""The run folder: its file names, and the readers and writers of its JSON and CSV files.

No torch here: the CLI, ``surgeon report`` and the training engine share these names. Tensors
(weights, momentum, snapshots) are written by their owners into the paths named below.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
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
    # the split "best" was chosen on (val or test), test error at that epoch and at the last
    "selected_on", "test_err_at_best", "final_test_err",
)  # fmt: skip


NAME_RE = re.compile(r"[A-Za-z0-9._+-]{1,200}")


def check_name(value: str, what: str, error: type[SurgeonError] = SurgeonError) -> str:
    """``value`` if it is one safe path component (``[A-Za-z0-9._+-]``, not ``.``/``..``, not
    starting with a dot, at most 200 characters); else ``error`` naming ``what`` it is."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value) or value.startswith("."):
        raise error(
            f"invalid {what} {value!r}: a name is one path component",
            hint="use letters, digits and . _ + - (not starting with a dot, at most 200 characters)",
        )
    return value


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


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (no race with
    other threads), else by setting and restoring it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path, folder: bool = False) -> None:
    """Give a file made by ``mkstemp`` or safetensors (0600) or a folder made by ``mkdtemp``
    (0700) the permissions a plain ``open``/``mkdir`` would: 0666 or 0777 less the umask."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def fsync_dir(folder: str | Path) -> None:
    """Make a rename or a new entry in ``folder`` durable (a no-op where folders cannot be
    opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def _atomic_file(path: Path, mode: str = "w", **kwargs: Any) -> Iterator[Any]:
    """An open temp file next to ``path`` that replaces it on success: permissions from the
    umask, fsynced, then ``os.replace`` and the folder fsynced; removed on any failure."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        follow_umask(tmp)
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON via a temp file in the same folder (umask permissions), fsync, ``os.replace``,
    fsync the folder: the one atomic JSON writer of the package (``surgeon.io`` uses it too)."""
    with _atomic_file(Path(path)) as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_csv_atomic(path: Path, rows: Iterable[dict[str, Any]], fields: tuple[str, ...]) -> None:
    """Rows as CSV with the header ``fields`` (other keys ignored), replaced in one step."""
    with _atomic_file(Path(path), newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in fields})


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def json_digest(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys): a config's or a state's hash."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


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
        if not isinstance(row, dict):
            continue
        if row.get("type") in ("step", "event"):  # events carry the step they happened at
            if row.get("step", 0) <= step:
                keep.append(line)
        elif row.get("epoch", 0) <= epoch:
            keep.append(line)
    with _atomic_file(path) as f:
        f.write("".join(k + "\n" for k in keep))


def write_summary(run: Path, summary: dict[str, Any]) -> None:
    """``summary.json`` (every key) and ``summary.csv`` (the :data:`SUMMARY_FIELDS`)."""
    write_json_atomic(Path(run) / SUMMARY_FILE, summary)
    write_csv_atomic(Path(run) / SUMMARY_CSV, [summary], SUMMARY_FIELDS)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on the folder itself (POSIX ``flock`` on its descriptor; no lock
    file), so runs sharing a folder merge their results one at a time."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):  # pragma: no cover - Windows: no lock
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _previous_results(folder: Path) -> tuple[str, list[dict[str, Any]]]:
    """``(recipe, rows)`` of the folder's ``results.json``; when it is missing or damaged, the
    summaries of the run folders found there."""
    try:
        old = json.loads((folder / RESULTS_FILE).read_text())
        rows = old["runs"]
        if isinstance(rows, list) and all(isinstance(r, dict) and "name" in r for r in rows):
            return str(old.get("recipe") or ""), rows
    except (OSError, ValueError, KeyError, TypeError):
        pass
    rows = []
    for sub in _children(folder) if folder.is_dir() else []:
        try:
            summary = read_summary(sub)
        except SurgeonError:
            summary = None
        if summary is not None and "name" in summary:
            rows.append(summary)
    return "", rows


def merge_results(
    previous: list[dict[str, Any]], new: list[dict[str, Any]], order: list[str] | None = None
) -> list[dict[str, Any]]:
    """Every row of ``previous`` and ``new`` (a new row replaces the previous one of the same
    run). With ``order`` (a recipe's runs) the runs it names come first, in that order, then
    the others as they were; without it, the previous rows keep their places and new runs
    follow."""
    rows = {r["name"]: r for r in previous}
    rows.update({r["name"]: r for r in new})
    first = [n for n in dict.fromkeys(order or []) if n in rows]
    named = set(first)
    rest = [r["name"] for r in [*previous, *new] if r["name"] not in named]
    return [rows[n] for n in [*first, *dict.fromkeys(rest)]]


def write_results(
    folder: Path, recipe: str, results: list[dict[str, Any]], order: list[str] | None = None
) -> None:
    """A recipe folder's ``results.json`` and ``results.csv``: every run's summary. Runs
    already listed there are kept, so runs sharing a folder add up (see :func:`merge_results`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        old_recipe, previous = _previous_results(folder)
        rows = merge_results(previous, results, order)
        write_json_atomic(folder / RESULTS_FILE, {"recipe": recipe or old_recipe, "runs": rows})
        write_csv_atomic(folder / RESULTS_CSV, rows, SUMMARY_FIELDS)
