"""Distributed data parallel through PyTorch's own engine (torchrun + DDP).

``surgeon train --nproc N`` re-launches itself under ``torch.distributed.run``; a process
started by torchrun finds ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in its environment and
joins the process group (NCCL on GPUs, gloo on CPU). Every rank trains on its shard of
each epoch's permutation; DDP all-reduces the gradients; rank 0 alone writes files.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

# A collective that waits longer than this raises instead of hanging (a dead peer).
TIMEOUT_S = float(os.environ.get("SURGEON_DIST_TIMEOUT", "120"))


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    launched: bool = False  # started by torchrun (DDP even at world size 1)

    @property
    def enabled(self) -> bool:
        return self.launched

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """The torchrun environment of this process (world size 1 outside torchrun)."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        launched="RANK" in os.environ
        and "WORLD_SIZE" in os.environ
        and "MASTER_ADDR" in os.environ,
    )


def init(device_type: str) -> DistInfo:
    """Join the process group if torchrun started us; return this process's place in it."""
    info = env_info()
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    return info


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """Rank 0's decision, on every rank (e.g. stop after divergence)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(t, 0)
    return bool(t.item())


RDZV_ID = "fx-surgeon"  # torchrun's job id: the same on every node of one run


def nodes_args(nnodes: int, node_rank: int, rdzv_endpoint: str | None) -> list[str]:
    """torchrun's flags for one run over ``nnodes`` nodes (c10d rendezvous at
    ``rdzv_endpoint``); ``["--standalone"]`` for one node."""
    from ..errors import TrainError

    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise TrainError(
            f"--node-rank {node_rank} is not in [0, {nnodes}) for --nnodes {nnodes}",
            hint="number the nodes 0 .. nnodes-1",
        )
    if nnodes == 1:
        if rdzv_endpoint:
            raise TrainError("--rdzv-endpoint needs --nnodes > 1", hint="drop --rdzv-endpoint")
        return ["--standalone"]
    host, _, port = (rdzv_endpoint or "").rpartition(":")
    if not host or not port.isdigit():
        raise TrainError(
            f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT, got {rdzv_endpoint!r}",
            hint="the address of node 0 and a free port, the same on every node",
        )
    return [
        "--nnodes", str(nnodes), "--node-rank", str(node_rank), "--rdzv-backend", "c10d",
        "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", os.environ.get("SURGEON_RDZV_ID", RDZV_ID),
    ]  # fmt: skip


def launch(nproc: int, argv: list[str], nodes: list[str] | None = None) -> int:
    """Run ``python -m surgeon <argv>`` under ``torch.distributed.run`` with ``nproc`` processes
    on this node (``nodes``: the flags of :func:`nodes_args`, one node by default); returns
    torchrun's exit code."""
    from torch.distributed import run as torchrun

    nodes = nodes or ["--standalone"]
    args = ["--nproc-per-node", str(nproc), *nodes, "-m", "surgeon", *argv]
    old = sys.argv
    try:
        torchrun.main(args)
    except SystemExit as exc:  # torchrun exits on worker failure with its own message
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except Exception as exc:  # ChildFailedError: a worker died; torchrun stopped the rest
        failures = getattr(exc, "failures", {})
        codes = sorted({f.exitcode for f in failures.values()})
        print(
            f"error: distributed run failed: worker rank(s) {sorted(failures)} exited with code(s) "
            f"{codes}; torchrun stopped the others. hint: see the worker's traceback above",
            file=sys.stderr,
        )
        return 1
    finally:
        sys.argv = old
    return 0
