"""One DDP run over two "nodes" on localhost (issue 18): two torchrun agents, one process
each, gloo, a c10d rendezvous on 127.0.0.1, started by ``surgeon train --nnodes 2``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgeon.errors import TrainError
from surgeon.train import TrainConfig, train
from surgeon.train.distributed import nodes_args

ARGS = [
    "--model", "mlp", "--model-arg", "hidden=(32,)", "--limit-train", "400", "--limit-test", "100",
    "--epochs", "2", "--batch-size", "40", "--quiet", "--device", "cpu",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost_match_one_process(tmp_path: Path) -> None:
    endpoint = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "SURGEON_RDZV_ID": f"test-{os.getpid()}", "OMP_NUM_THREADS": "1"}
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "surgeon",
                "train",
                *ARGS,
                "--out",
                str(tmp_path),
                "--name",
                "two-nodes",
                "--nproc",
                "1",
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--rdzv-endpoint",
                endpoint,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    try:
        outputs = [a.communicate(timeout=240)[0] for a in agents]
    finally:
        for a in agents:
            a.kill()
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    run = tmp_path / "two-nodes"
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    cfg = TrainConfig(
        model="mlp", model_args={"hidden": (32,)}, limit_train=400, limit_test=100, epochs=2,
        batch_size=40, device="cpu",
    )  # fmt: skip
    train(cfg, tmp_path / "single")
    a, b = (
        load_file(str(run / "model.safetensors")),
        load_file(str(tmp_path / "single" / "model.safetensors")),
    )
    for k in a:  # the same global batch: equal to float tolerance (the all-reduce's sums)
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_node_flags_for_torchrun() -> None:
    assert nodes_args(1, 0, None) == ["--standalone"]
    flags = nodes_args(2, 1, "10.0.0.1:29400")
    assert flags[:4] == ["--nnodes", "2", "--node-rank", "1"]
    assert flags[flags.index("--rdzv-endpoint") + 1] == "10.0.0.1:29400"
    assert flags[flags.index("--rdzv-backend") + 1] == "c10d"
    with pytest.raises(TrainError, match="needs --rdzv-endpoint"):
        nodes_args(2, 0, None)
    with pytest.raises(TrainError, match="not in"):
        nodes_args(2, 2, "h:1")
