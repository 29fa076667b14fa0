"""A recipe's runs as Ray tasks: one machine or a cluster (``surgeon train --backend ray``).

Each run is one task with its resources (``num_cpus``, ``num_gpus``) that writes the same run
folder as a local run under the same ``--out``; on a cluster that folder must be on a
filesystem every node sees at the same path. A task whose worker dies (node lost, process
killed) is retried by Ray and continues from the run's last checkpoint, bit-exactly as
``surgeon train --resume`` would; a run that fails for its own reasons (divergence, a bad
config or dataset) returns its summary and is not retried. Ctrl-C on the driver cancels the
tasks. Ray is imported only here, and only when this backend is used.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import rundir
from ..errors import SurgeonError, TrainError
from .config import TrainConfig

MAX_RETRIES = 3  # a dead worker's run is started again (from its checkpoint) this many times


def require_ray() -> Any:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise TrainError("--backend ray needs Ray", hint='pip install "fx-surgeon[ray]"') from None
    return ray


def connect(address: str | None = None, **init_kwargs: Any) -> bool:
    """Join the Ray cluster at ``address`` (or start a local one); True when this call started
    the connection (the caller shuts it down)."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    ray.init(address=address, **(kwargs | init_kwargs))
    return True


class GridInterrupted(KeyboardInterrupt):
    """Ctrl-C on the driver: the unfinished tasks were cancelled."""

    def __init__(self, done: int, cancelled: int) -> None:
        super().__init__(f"{done} run(s) finished, {cancelled} cancelled")
        self.done, self.cancelled = done, cancelled


def run_ray(
    configs: list[TrainConfig],
    out: Path,
    *,
    recipe_name: str = "",
    address: str | None = None,
    gpus_per_run: float = 0.0,
    cpus_per_run: float | None = None,
    max_retries: int = MAX_RETRIES,
    on_done: Callable[[dict[str, Any]], None] | None = None,
    task_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Train ``configs`` as Ray tasks into ``out/<run name>/``; return their summaries in config
    order and keep ``results.json``/``results.csv`` up to date as runs finish.

    ``cpus_per_run`` is each task's CPU share and its torch threads; by default the threads a
    local run uses here (``torch.get_num_threads()``, at most a node's CPUs), since on the CPU
    a run's floats depend on its thread count: so the results equal the local runner's bit
    for bit. ``task_options`` go to each task's ``.options()`` (e.g. a ``runtime_env``)."""
    from .runner import _failed, write_results

    ray = require_ray()
    out = out.resolve()  # the workers' working directory is not ours
    out.mkdir(parents=True, exist_ok=True)
    started = connect(address)
    if cpus_per_run is None:
        cpus_per_run = _local_threads(ray)
    task = ray.remote(_run_task).options(
        num_cpus=cpus_per_run,
        num_gpus=gpus_per_run,
        max_retries=max_retries,
        retry_exceptions=False,  # only a dead worker is retried, never the run's own failure
        **(task_options or {}),
    )
    cwd = os.getcwd()  # relative --data/--model paths mean the same on every node
    for c in configs:  # each task's log; its "[ray] attempt" lines count the retries
        (out / f".{c.name}.log").write_text("")
    refs = {
        task.remote(c.to_dict(), str(out), cwd, cpus_per_run, gpus_per_run): i
        for i, c in enumerate(configs)
    }
    results: dict[int, dict[str, Any]] = {}
    order = [c.name for c in configs] if recipe_name else None
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = refs[done[0]]
            try:
                summary = ray.get(done[0])
            except Exception as exc:  # retries spent, or the task itself could not run
                summary = _failed(configs[i], _ray_failure(exc), out / configs[i].name)
            results[i] = summary
            if on_done:
                on_done(summary)
            write_results(out, recipe_name, [results[k] for k in sorted(results)], order)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref)  # KeyboardInterrupt in the task: the run stops at a clean point
        _wait_cancelled(ray, pending)
        raise GridInterrupted(len(results), len(pending)) from None
    finally:
        if started:
            ray.shutdown()
    return [results[i] for i in range(len(configs))]


def _local_threads(ray: Any) -> float:
    """The torch threads of a run in this process, capped by the largest node's CPUs (a task
    that asks for more than any node has would never start)."""
    import torch

    node_cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return float(max(min(torch.get_num_threads(), max(node_cpus, default=1)), 1))


def _wait_cancelled(ray: Any, refs: list[Any], timeout_s: float = 30.0) -> None:
    """Give cancelled tasks a moment to stop (their checkpoint stays intact), then force."""
    if not refs:
        return
    _, left = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    for ref in left:
        ray.cancel(ref, force=True)


def _ray_failure(exc: BaseException) -> str:
    lines = [x for x in str(exc).strip().splitlines() if x.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else 'task failed'}"


def _run_task(
    cfg_dict: dict[str, Any], out: str, cwd: str, cpus: float, gpus: float
) -> dict[str, Any]:
    """One run in a Ray worker: a new run, or the continuation of one a dead worker left."""
    if os.path.isdir(cwd):
        os.chdir(cwd)
    if not gpus:  # a CPU task must not pick a GPU it was not given (device "auto")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    torch.set_num_threads(max(int(cpus), 1))
    from rich.console import Console

    from .engine import resume, train
    from .progress import PlainReporter
    from .runner import _failed

    cfg = TrainConfig.from_dict(cfg_dict)
    run_dir = Path(out) / cfg.name
    log_path = Path(out) / f".{cfg.name}.log"
    attempt = 1 + sum(1 for line in _read_lines(log_path) if line.startswith("[ray] attempt "))
    if attempt > 1:  # SURGEON_FAULT (tests) injects a crash into the first attempt only
        os.environ.pop("SURGEON_FAULT", None)
    with open(log_path, "a") as log:
        console = Console(file=log, highlight=False, width=160)
        reporter = PlainReporter(console)
        latest = run_dir / rundir.CHECKPOINTS_DIR / rundir.LATEST_FILE
        summary = rundir.read_summary(run_dir) if attempt > 1 else None
        how = "new run"
        if summary is None and latest.is_file():
            how = "resumed from its last checkpoint"
        elif summary is None and run_dir.exists() and attempt > 1:
            shutil.rmtree(run_dir)  # died before its first checkpoint: start again
            how = "started again (no checkpoint yet)"
        state = "already finished" if summary is not None else how
        log.write(f"[ray] attempt {attempt} on {socket.gethostname()} pid {os.getpid()}: {state}\n")
        log.flush()
        if summary is not None:
            return summary
        try:
            if how.startswith("resumed"):
                return resume(run_dir, reporter=reporter)
            return train(cfg, run_dir, reporter=reporter)
        except SurgeonError as exc:
            return _failed(cfg, str(exc), run_dir)
        except Exception as exc:  # the run's own failure: recorded, not retried
            summary = _failed(cfg, f"{type(exc).__name__}: {exc}", run_dir)
            summary["traceback"] = traceback.format_exc()
            console.print(summary["traceback"])
            return summary


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


__all__ = ["GridInterrupted", "connect", "require_ray", "run_ray"]
