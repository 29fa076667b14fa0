"""The command line answers ``--help`` and ``--version`` without importing torch or timm."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import surgeon

HEAVY = ("torch", "timm", "torchvision")

PROBE = f"""
import contextlib, io, json, sys
from surgeon_cli.app import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    rc = main(sys.argv[1:])
heavy = [m for m in {HEAVY!r} if m in sys.modules]
print(json.dumps(dict(rc=rc, out=out.getvalue(), heavy=heavy)))
"""


def run_cli(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["-h"],
        ["--version"],
        ["train", "--help"],
        ["train", "-h"],
        ["insert", "--help"],
        ["inspect-params", "--help"],
        ["report", "--help"],
        ["fold", "--help"],
        ["online", "--help"],
    ],
    ids=" ".join,
)
def test_help_and_version_import_neither_torch_nor_timm(args):
    result = run_cli(*args)
    assert result["rc"] == 0
    assert result["heavy"] == []
    if args == ["--version"]:
        assert result["out"] == f"fx-surgeon {surgeon.__version__}\n"
    else:
        assert "Usage:" in result["out"]


def test_python_dash_m_surgeon_help_without_torch():
    code = "import runpy, sys; sys.argv = ['surgeon', '--help']\n"
    code += "try:\n    runpy.run_module('surgeon', run_name='__main__')\nexcept SystemExit as e:\n"
    code += f"    print(e.code, [m for m in {HEAVY!r} if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "0 []", proc.stdout + proc.stderr


def test_train_help_shows_the_config_defaults():
    out = run_cli("train", "--help")["out"]
    for text in ("--lr", "0.04", "--no-dropout", "--model-arg", "KEY=VALUE", "--nproc"):
        assert text in out
    assert "<bool>" not in out and "<str>" not in out


def test_usage_errors_are_one_line_with_exit_2():
    proc = subprocess.run(
        [sys.executable, "-m", "surgeon", "train", "--lr", "abc"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: invalid value for '--lr'") and ". hint: " in lines[0]
