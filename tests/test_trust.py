"""Loading as an attacker and a damaged disk would try it: no code runs unasked, every
damaged or crafted file is one SurgeonError, and nothing is allocated before the record and
the weights' header agree."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import surgeon
from surgeon.errors import SurgeonError

EVIL = """
import pathlib
from torch import nn

pathlib.Path(__file__).with_name("MARKER").write_text("ran")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.act = nn.ReLU()
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        return self.out(self.act(self.fc(x)))
"""


@pytest.fixture
def code_model(tmp_path: Path) -> tuple[Path, Path]:
    """A model folder whose record names a .py file that leaves a marker when imported."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "helper.py").write_text(EVIL)
    gm = surgeon.insert(surgeon.build_model(str(src / "helper.py")), input_size=[4])
    folder = surgeon.save(gm, tmp_path / "saved")
    (src / "MARKER").unlink()
    return folder, src / "MARKER"


def test_a_model_file_named_by_a_record_does_not_run_without_trust(code_model) -> None:
    folder, marker = code_model
    with pytest.raises(SurgeonError, match="names model code .*helper.py") as exc:
        surgeon.load(folder)
    assert "trust" in exc.value.hint and not marker.exists()
    loaded = surgeon.load(folder, trust_code=True)
    assert marker.exists() and isinstance(loaded, torch.nn.Module)


def test_the_spec_is_saved_relative_to_the_folder(code_model, tmp_path, monkeypatch) -> None:
    folder, _ = code_model
    assert json.loads((folder / "surgery.json").read_text())["source"]["spec"] == "../src/helper.py"
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    monkeypatch.chdir(moved)  # the folder works from any working directory
    assert surgeon.load(folder, trust_code=True) is not None


def test_the_cli_refuses_a_model_file_without_trust(code_model, tmp_path) -> None:
    folder, marker = code_model
    cmd = [sys.executable, "-m", "surgeon", "fold", str(folder), "-o", str(tmp_path / "f")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--trust-code" in lines[0] and not marker.exists()
    assert not (tmp_path / "f").exists()
    out = subprocess.run([*cmd, "--trust-code"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert marker.exists()


def _saved(tmp_path: Path, spec: str = "mlp", args: dict | None = None, **kw) -> Path:
    args = args if args is not None else {"hidden": [8], "input_size": [3, 4, 4]}
    gm = surgeon.insert(surgeon.build_model(spec, args), kw.get("shift", "element"), "channel")
    return surgeon.save(gm, tmp_path / "saved")


def _edit(folder: Path, fn) -> None:
    path = folder / "surgery.json"
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("key", ["pretrained", "checkpoint_path", "pretrained_cfg_overlay"])
def test_arguments_that_load_files_are_refused(tmp_path, key) -> None:
    folder = _saved(tmp_path)
    _edit(folder, lambda m: m["source"]["args"].update({key: True}))
    with pytest.raises(SurgeonError, match=f"asks for {key}.*loads files or downloads"):
        surgeon.load(folder)


def _rss_kib(code: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    return int(out.stdout.strip().splitlines()[-1])


def test_a_crafted_input_size_allocates_nothing(tmp_path) -> None:
    folder = _saved(tmp_path)
    _edit(folder, lambda m: [p.update(input_size=[3, 20000, 20000]) for p in m["passes"]])
    with pytest.raises(SurgeonError, match="input size .* out of bounds"):
        surgeon.load(folder)
    # a size just past the bound: refused before anything is built, so loading adds almost
    # nothing to the memory of a process that has imported torch (the 2 x 3 x 4096 x 4096
    # element-mode tensors it implies would be 400 MB)
    _edit(folder, lambda m: [p.update(input_size=[3, 4096, 4096]) for p in m["passes"]])
    code = (
        "import resource, surgeon, surgeon.adapters, surgeon.io\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        f"    surgeon.load({str(folder)!r})\n"
        "except surgeon.SurgeonError as e:\n"
        "    assert 'out of bounds' in str(e), e\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)"
    )
    assert _rss_kib(code) < 100_000  # KiB of growth


def test_damaged_weights_are_one_error(tmp_path) -> None:
    folder = _saved(tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    for damaged in (data[: len(data) // 2], b"\x00" * 16, struct.pack("<Q", 10**12) + data[8:]):
        weights.write_bytes(damaged)
        with pytest.raises(SurgeonError, match="not a readable safetensors file"):
            surgeon.load(folder)


def test_a_shape_edited_in_the_record_is_caught_on_the_header(tmp_path) -> None:
    folder = _saved(tmp_path)
    _edit(folder, lambda m: m["passes"][-1].update(shift="layer"))
    with pytest.raises(SurgeonError, match="tensors of another shape"):
        surgeon.load(folder)


def _mutations():
    leaf = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.text(max_size=8),
        st.lists(st.integers(-5, 10**6), max_size=5), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    )  # fmt: skip
    return st.lists(st.tuples(st.integers(0, 10**6), leaf), min_size=1, max_size=3)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return _saved(tmp_path_factory.mktemp("pristine"))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(mutations=_mutations())
def test_any_mutated_record_loads_or_fails_in_one_line(pristine, tmp_path, mutations) -> None:
    folder = Path(tempfile.mkdtemp(dir=tmp_path)) / "m"
    shutil.copytree(pristine, folder)
    meta = json.loads((folder / "surgery.json").read_text())
    for where, value in mutations:
        paths = [p for p in _paths(meta) if p]
        path = paths[where % len(paths)]
        parent = meta
        for k in path[:-1]:
            parent = parent[k]
        parent[path[-1]] = value
    (folder / "surgery.json").write_text(json.dumps(meta))
    try:
        surgeon.load(folder)
    except SurgeonError as exc:
        assert "\n" not in exc.message
    shutil.rmtree(folder)


def test_saved_files_follow_the_umask(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        folder = _saved(tmp_path)
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in folder.iterdir())


def test_saving_a_meta_model_is_one_error(tmp_path) -> None:
    with torch.device("meta"):
        gm = surgeon.insert(surgeon.build_model("mlp", {"input_size": [3, 4, 4]}), "layer", "layer")
    with pytest.raises(SurgeonError, match="meta device"):
        surgeon.save(gm, tmp_path / "m")
    assert not (tmp_path / "m").exists()
