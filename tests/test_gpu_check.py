"""benchmarks/gpu_check.py --cpu-smoke: every section runs at toy size on the CPU and writes
its JSON with the keys the GPU run fills, so the one-command GPU check cannot rot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("triton", "train_speed", "ddp", "real_run", "large_models")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--cpu-smoke", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return out, proc


def load(out: Path, name: str) -> dict:
    path = out / f"{name}.json"
    assert path.is_file(), f"{name}.json missing"
    return json.loads(path.read_text())


def rate(value: object) -> bool:
    """A positive, finite number (images/s, ms)."""
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_runs_and_summarises(smoke) -> None:
    out, proc = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = load(out, "summary")
    assert summary["smoke"] is True and "not measurements" in summary["note"]
    assert list(summary["sections"]) == list(SECTIONS)
    for name, sec in summary["sections"].items():
        assert sec["status"] == "ok", (name, sec)
    assert summary["wall_s"] < 120
    assert summary["env"]["torch"] and summary["targets"]["tool_vs_hand"] == 0.95
    names = [c["name"] for c in summary["checks"]]
    assert "fused layer step / plain, eager" in names
    assert "DDP overhead, surgeon train" in names
    assert "section" in proc.stdout and "check" in proc.stdout  # the printed table


def test_triton_section(smoke) -> None:
    r = load(smoke[0], "triton")
    assert r["status"] == "ok"
    assert r["correctness"] == {"skipped": "no CUDA"} and r["micro"] == {"skipped": "no CUDA"}
    if "cases" in r["interpreter"]:  # triton installed: the worker path in its interpreter
        assert r["interpreter"]["passed"] and r["interpreter"]["cases"] > 0
    eager = {x["variant"]: x for x in r["overhead_eager"]["results"]}
    assert {"plain", "batchnorm", "ss-layer fused", "ss-element relu-fused"} <= set(eager)
    assert eager["plain"]["ratio"] == 1.0
    assert all(rate(x["step_ms"]) and rate(x["ratio"]) for x in eager.values())
    compiled = r["overhead_compiled"]["results"]
    assert {x["variant"] for x in compiled} == {"plain", "ss-layer fused"}
    assert all(x["compiled"] for x in compiled)


def test_train_speed_section(smoke) -> None:
    r = load(smoke[0], "train_speed")
    assert r["status"] == "ok" and r["bf16"] == {"skipped": "no CUDA"}
    for phase in ("eager", "compiled"):
        m = r[phase]
        assert rate(m["hand_loop_images_per_s"]) and rate(m["tool_loop_images_per_s"])
        assert math.isfinite(m["tool_vs_hand"]) and m["tool_vs_hand"] > 0
    assert rate(r["eager"]["data_only_images_per_s"]) and r["eager"]["data_vs_model"] > 1


def test_ddp_section(smoke) -> None:
    r = load(smoke[0], "ddp")
    assert r["status"] == "ok"
    assert r["group"] == {"backend": "gloo", "world_size": 1, "ddp": True}
    for part in ("engine", "steps"):
        assert all(rate(v) for v in r[part]["no_ddp_images_per_s"] + r[part]["ddp_images_per_s"])
        overhead = r[part]["overhead"]  # 1 - ratio of rates: below 1; toy sizes are noisy
        assert math.isfinite(overhead) and overhead < 1


def test_real_run_section(smoke) -> None:
    out = smoke[0]
    r = load(out, "real_run")
    assert r["status"] == "ok"
    assert r["config"]["lr"] == 0.04
    assert set(r["runs"]) == {
        "plain", "batchnorm", "shift-layer+scale-layer_mult1", "shift-layer+scale-layer_mult0.1"
    }  # fmt: skip
    for name, run in r["runs"].items():
        assert run["status"] == "ok", (name, run)
        assert len(run["val_acc"]) == 1 and 0 <= run["val_acc"][0] <= 1
        assert (out / "real_run" / name / "metrics.jsonl").is_file()
    assert r["runs"]["shift-layer+scale-layer_mult1"]["ss_lr_mult"] == 1.0


def test_large_models_section(smoke) -> None:
    r = load(smoke[0], "large_models")
    assert r["status"] == "ok"
    assert set(r["models"]) == {
        "large-c100-resnet50", "large-c100-convnext_tiny", "large-c100-vit_small"
    }  # fmt: skip
    for name, m in r["models"].items():
        assert not m["errors"], (name, m["errors"])
        assert set(m["images_per_s"]) == {
            "plain", "shift-channel+scale-channel", "shift-layer+scale-layer"
        }  # fmt: skip
        assert all(rate(v) for v in m["images_per_s"].values())
