"""Checkpoints: safetensors for tensors, JSON for the rest, an atomic ``latest.json`` pointer.

``checkpoints/step_00001234/`` holds ``model.safetensors`` (state dict), ``optim.safetensors``
(momentum buffers by parameter name, RNG states) and ``state.json`` (step, epoch, batch in
epoch, EMA, epoch accumulators). ``checkpoints/latest.json`` names the newest complete one;
it is replaced atomically after the folder is complete, so a killed process leaves the
previous checkpoint valid. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import rundir
from ..errors import TrainError
from ..rundir import write_json_atomic

KEEP = 2  # complete checkpoints kept on disk


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}


def save_checkpoint(
    folder: Path, model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]
) -> Path:
    """Write checkpoint ``step_<step>`` under ``folder`` and point ``latest.json`` at it."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".step_*"):  # a write cut short by a killed process
        shutil.rmtree(stale, ignore_errors=True)
    name = rundir.checkpoint_name(state["step"])
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{name}."))
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
    try:
        save_file(_state_dict(model), str(tmp / rundir.WEIGHTS_FILE))
        save_file(tensors, str(tmp / rundir.OPTIM_FILE))
        write_json_atomic(tmp / rundir.STATE_FILE, state)
        final = folder / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json_atomic(folder / rundir.LATEST_FILE, {"checkpoint": name, "step": state["step"]})
    old = sorted(p for p in folder.glob("step_*") if p.is_dir() and p.name != name)
    for p in old[: max(len(old) - (KEEP - 1), 0)]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimiser momentum and RNG states; return ``state.json``."""
    weights = load_file(str(path / rundir.WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise TrainError(
            f"checkpoint {path} does not match the model ({len(missing)} missing, {len(unexpected)} unexpected keys)",
            hint="resume with the same code and config that wrote it",
        )
    tensors = load_file(str(path / rundir.OPTIM_FILE))
    params = dict(model.named_parameters())
    for key, buf in tensors.items():
        if key.startswith("momentum."):
            p = params[key[len("momentum.") :]]
            opt.state[p]["momentum_buffer"] = buf.to(p.device)
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return json.loads((path / rundir.STATE_FILE).read_text())
