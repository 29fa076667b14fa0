"""Spreading a recipe's independent runs over GPUs (or CPU workers) from a queue.

Each run is a subprocess ``python -m surgeon train --config RUN.json`` pinned to one GPU
with ``CUDA_VISIBLE_DEVICES`` (or a CPU slot); a slot takes the next run from the queue
when its run ends. A run that fails or diverges is recorded; the others go on. However the
queue ends (done, an error, Ctrl-C or SIGTERM), no child outlives it: each running one gets
SIGINT (it stops at a clean point, its last checkpoint intact), then SIGKILL after
``STOP_GRACE_S``; the folder of the runs' config files is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import rundir
from .config import TrainConfig
from .runner import _failed, write_results

STOP_GRACE_S = 10.0  # seconds a child has to stop after SIGINT before it is killed


def slots(gpus: list[int] | None, runs_per_gpu: int, workers: int) -> list[dict[str, str]]:
    """One environment per concurrent run: a GPU id (repeated runs_per_gpu times) or a CPU slot."""
    if gpus:
        return [{"CUDA_VISIBLE_DEVICES": str(g)} for g in gpus for _ in range(max(runs_per_gpu, 1))]
    threads = max((os.cpu_count() or 1) // max(workers, 1), 1)
    return [
        {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads)}
        for _ in range(max(workers, 1))
    ]


def run_parallel(
    configs: list[TrainConfig],
    out: Path,
    envs: list[dict[str, str]],
    *,
    recipe_name: str = "",
    on_done: Callable[[dict[str, Any]], None] | None = None,
    poll_s: float = 0.5,
) -> list[dict[str, Any]]:
    """Run ``configs`` with ``len(envs)`` at a time; return their summaries in config order."""
    out.mkdir(parents=True, exist_ok=True)
    queue = deque(enumerate(configs))
    free = list(range(len(envs)))
    running: dict[int, tuple[subprocess.Popen, int, TrainConfig, Path]] = {}
    results: dict[int, dict[str, Any]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="surgeon-queue-"))
    old_term = _sigterm_as_interrupt()
    try:
        while queue or running:
            while queue and free:
                i, cfg = queue.popleft()
                slot = free.pop(0)
                cfg_file = tmp / f"{i}.json"
                cfg_file.write_text(json.dumps(cfg.to_dict()))
                log = open(out / f".{cfg.name}.log", "w")  # noqa: SIM115 (closed when the run ends)
                cmd = [
                    sys.executable,
                    "-m",
                    "surgeon",
                    "train",
                    "--config",
                    str(cfg_file),
                    "--out",
                    str(out),
                    "--quiet",
                ]
                proc = subprocess.Popen(
                    cmd, env={**os.environ, **envs[slot]}, stdout=log, stderr=subprocess.STDOUT
                )
                running[i] = (proc, slot, cfg, Path(log.name))
                log.close()
            for i, (proc, slot, cfg, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[i]
                free.append(slot)
                summary = rundir.read_summary(out / cfg.name)
                if summary is not None:
                    results[i] = summary
                else:
                    tail = log.read_text().strip().splitlines()[-1:] if log.exists() else []
                    results[i] = _failed(
                        cfg,
                        f"exit code {proc.returncode}: {tail[0] if tail else 'no output'}",
                        out / cfg.name,
                    )
                if on_done:
                    on_done(results[i])
                write_results(
                    out,
                    recipe_name,
                    [results[k] for k in sorted(results)],
                    [c.name for c in configs] if recipe_name else None,
                )
            time.sleep(poll_s)
    finally:  # no child left running, and the runs' config files removed
        try:
            _stop([proc for proc, *_ in running.values()])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
    return [results[i] for i in range(len(configs))]


def _stop(procs: list[subprocess.Popen], grace_s: float = STOP_GRACE_S) -> None:
    """SIGINT to each running child (a clean stop), SIGKILL to those still alive after
    ``grace_s``; wait for all of them (no zombies)."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace_s
    for p in live:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _sigterm_as_interrupt() -> Any:
    """SIGTERM raises KeyboardInterrupt (so the ``finally`` stops the children) while the
    queue runs; returns the previous handler, or None outside the main thread."""
    try:
        return signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread: signals are the main thread's business
        return None
