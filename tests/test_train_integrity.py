"""Runs under attack (issue 14, the training side): damaged and edited checkpoints, a process
killed while a checkpoint is written, Ctrl-C, hand-edited configs, names that climb out of
``--out``, shared result files, divergence, the umask and undecodable images.

Every failure is one line on stderr with exit code 2 (3: a diverged run; 130: Ctrl-C); a
damaged checkpoint is passed over for the newest intact one, and resuming from it gives the
uninterrupted run's weights bit for bit. Tiny MLP runs on the embedded sample, on the CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from surgeon_cli.app import main

from surgeon import rundir
from surgeon.errors import TrainError
from surgeon.train import TrainConfig, load_recipe
from surgeon.train.checkpoint import check_checkpoint
from surgeon.train.engine import RUN_FIELDS

TINY = [
    "--model", "mlp", "--model-arg", "hidden=(16,)", "--data", "sample", "--limit-train", "200",
    "--limit-test", "100", "--batch-size", "50", "--device", "cpu", "--quiet",
]  # fmt: skip
PROPERTY = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module", autouse=True)
def _env(training_env):
    """The shared data cache and one torch thread (``training_env`` in conftest.py)."""


def cli(capsys, *args: str | Path) -> tuple[int, str, str]:
    rc = main(["train", *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and ". hint: " in lines[0], lines[0]
    return lines[0]


def notices(out: str) -> list[str]:
    return [line for line in out.splitlines() if "resuming from" in line]


def subprocess_env(cache: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "SURGEON_CACHE": str(cache), "OMP_NUM_THREADS": "1", **extra}


def weights(run: Path) -> dict:
    return load_file(str(run / rundir.WEIGHTS_FILE))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict[int, Path]:
    """Finished runs of 1 and 2 epochs (4 steps each): 1 and 2 checkpoints."""
    root = tmp_path_factory.mktemp("finished")
    runs = {}
    for epochs in (1, 2):
        assert main(["train", *TINY, "--epochs", str(epochs), "--out", str(root), "--name", f"e{epochs}"]) == 0  # fmt: skip
        runs[epochs] = root / f"e{epochs}"
    return runs


def copy_run(src: Path, root: Path) -> Path:
    dst = root / src.name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


# --- damaged and edited checkpoints ---------------------------------------------------------


def _mutate_bytes(data: bytes, draw) -> bytes:
    how = draw(st.sampled_from(["truncate", "flip", "insert", "replace"]))
    at = draw(st.integers(0, max(len(data) - 1, 0)))
    if how == "truncate":
        return data[:at]
    if how == "flip":
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    if how == "insert":
        return data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    return draw(st.binary(max_size=64))


JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False),
    st.text(max_size=8), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip


def _mutate_json(obj: dict, draw) -> object:
    """A key added, dropped or given another value, at the top or inside ``run``; or the
    whole object replaced by another JSON value."""
    how = draw(st.sampled_from(["add", "drop", "set", "set_run", "drop_run", "add_run", "whole"]))
    obj = json.loads(json.dumps(obj))
    if how == "whole":
        return draw(JSON_VALUES)
    target = obj["run"] if how.endswith("_run") and isinstance(obj.get("run"), dict) else obj
    keys = sorted(target)
    if how.startswith("add"):
        target[draw(st.text(min_size=1, max_size=8))] = draw(JSON_VALUES)
    elif how.startswith("drop") and keys:
        del target[draw(st.sampled_from(keys))]
    elif keys:
        target[draw(st.sampled_from(keys))] = draw(JSON_VALUES)
    return obj


@PROPERTY
@given(data=st.data())
def test_mutated_state_json_exits_2_with_one_line(finished, tmp_path_factory, capsys, data):
    """The only checkpoint's state.json, damaged or edited any way: one line naming it, exit
    2, before anything is loaded; a change that leaves the JSON the same resumes as before."""
    run = copy_run(finished[1], tmp_path_factory.mktemp("state"))
    path = run / "checkpoints" / "step_00000004" / "state.json"
    original = path.read_bytes()
    if data.draw(st.booleans(), label="byte-level"):
        new = _mutate_bytes(original, data.draw)
    else:
        new = json.dumps(_mutate_json(json.loads(original), data.draw)).encode()
    path.write_bytes(new)
    try:
        unchanged = json.loads(new) == json.loads(original)
    except (ValueError, UnicodeDecodeError):
        unchanged = False
    rc, out, err = cli(capsys, "--resume", run)
    if unchanged:
        assert rc == 0 and not err, err
    else:
        assert rc == 2, (rc, out, err)
        assert "state.json" in one_line_error(err)
        assert "Traceback" not in out + err


@PROPERTY
@given(data=st.data())
def test_mutated_latest_json_falls_back_to_the_newest_intact(
    finished, tmp_path_factory, capsys, data
):
    """latest.json damaged, edited, deleted or pointing elsewhere: the resume takes the newest
    intact checkpoint (step 8) and says so in at most one line; the run is unchanged."""
    run = copy_run(finished[2], tmp_path_factory.mktemp("latest"))
    path = run / "checkpoints" / "latest.json"
    original = path.read_bytes()
    how = data.draw(st.sampled_from(["bytes", "json", "delete", "point"]), label="how")
    if how == "bytes":
        path.write_bytes(_mutate_bytes(original, data.draw))
    elif how == "json":
        path.write_text(json.dumps(_mutate_json({"run": {}, **json.loads(original)}, data.draw)))
    elif how == "delete":
        path.unlink()
    else:
        name = data.draw(st.sampled_from(["step_00000004", "step_00000099", "../../x", "/etc"]))
        path.write_text(json.dumps({"checkpoint": name, "step": 4}))
    before = (run / "summary.json").read_text()
    rc, out, err = cli(capsys, "--resume", run)
    assert rc == 0 and not err, err
    assert len(notices(out)) <= 1
    assert all("step_00000008" in line and "latest.json" in line for line in notices(out))
    assert (run / "summary.json").read_text() == before
    assert same_weights(run, finished[2])


DAMAGE = {
    "weights truncated": ("step_00000008/model.safetensors", lambda b: b[: len(b) // 2]),
    "weights header garbled": ("step_00000008/model.safetensors", lambda b: b"\xff" * 16 + b[16:]),
    "weights data flipped": ("step_00000008/model.safetensors", lambda b: b[:-9] + bytes([b[-9] ^ 1]) + b[-8:]),
    "momentum truncated": ("step_00000008/optim.safetensors", lambda b: b[:100]),
    "state unknown key": ("step_00000008/state.json", lambda b: b.replace(b'"run": {', b'"run": {"x": 1, ', 1)),
    "state missing key": ("step_00000008/state.json", lambda b: b.replace(b'"best_epoch"', b'"best_epochs"', 1)),
    "state value edited": ("step_00000008/state.json", lambda b: b.replace(b'"epoch": 2', b'"epoch": 1', 1)),
    "state deleted": ("step_00000008/state.json", None),
}  # fmt: skip


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_bit_exactly(finished, tmp_path, capsys, case):
    """The newest checkpoint damaged: one line names the file and the checkpoint taken
    instead; the second epoch is trained again from it and ends bit-identical."""
    run = copy_run(finished[2], tmp_path)
    name, damage = DAMAGE[case]
    path = run / "checkpoints" / name
    if damage is None:
        path.unlink()
    else:
        path.write_bytes(damage(path.read_bytes()))
    rc, out, err = cli(capsys, "--resume", run)
    assert rc == 0 and not err, err
    (line,) = notices(out)
    assert "step_00000004" in line and Path(name).name in line
    assert same_weights(run, finished[2])
    assert (run / "summary.json").read_text() == (finished[2] / "summary.json").read_text()


def test_every_checkpoint_damaged_is_one_line(finished, tmp_path, capsys):
    run = copy_run(finished[2], tmp_path)
    for step in ("step_00000004", "step_00000008"):
        weights_file = run / "checkpoints" / step / "model.safetensors"
        weights_file.write_bytes(weights_file.read_bytes()[:1000])
    rc, out, err = cli(capsys, "--resume", run)
    assert rc == 2
    line = one_line_error(err)
    assert "step_00000008/model.safetensors" in line and "truncated" in line
    assert "1 older checkpoint" in line


# --- config on resume --------------------------------------------------------------------------


def test_edited_config_is_refused_and_command_line_changes_are_logged(finished, tmp_path, capsys):
    run = copy_run(finished[2], tmp_path)
    config = run / "config.json"
    original = config.read_text()
    config.write_text(original.replace('"lr": 0.04', '"lr": 0.5'))
    rc, _, err = cli(capsys, "--resume", run)
    assert rc == 2
    assert "config.json" in (line := one_line_error(err)) and "lr 0.04 -> 0.5" in line
    config.write_text(original.replace('"epochs": 2', '"epochs": 3'))  # by hand: refused too
    rc, _, err = cli(capsys, "--resume", run)
    assert rc == 2 and "epochs 2 -> 3" in one_line_error(err)
    config.write_text(original)
    rc, _, err = cli(capsys, "--resume", run, "--epochs", "3")  # on the command line: logged
    assert rc == 0, err
    events = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if r["type"] == "event"]  # fmt: skip
    assert events == [
        {"type": "event", "event": "config_change", "key": "epochs", "old": 2, "new": 3,
         "step": 8, "epoch": 2}
    ]  # fmt: skip
    assert json.loads(config.read_text())["epochs"] == 3
    assert json.loads((run / "summary.json").read_text())["epochs_run"] == 3
    rc, _, err = cli(capsys, "--resume", run)  # the new checkpoint records the new config
    assert rc == 0, err


# --- a process killed while a checkpoint is being written ----------------------------------------


def test_killed_during_a_checkpoint_write_resumes_from_the_previous(
    finished, tmp_path, capsys, training_env
):
    """SIGKILL while the second checkpoint's files are on disk but not yet renamed into place
    (SURGEON_SLOW_CHECKPOINT holds it there): latest.json still names the first, the
    half-written folder is hidden and ignored, and the resume ends bit-identical."""
    argv = [sys.executable, "-m", "surgeon_cli.app", "train", *TINY, "--epochs", "2",
            "--out", str(tmp_path), "--name", "e2"]  # fmt: skip
    env = subprocess_env(training_env, SURGEON_SLOW_CHECKPOINT="3")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = tmp_path / "e2" / "checkpoints"
    deadline = time.monotonic() + 240
    try:
        while not (
            (ckpts / "latest.json").is_file()
            and any((p / "state.json").is_file() for p in ckpts.glob(".step_00000008.*"))
        ):
            if proc.poll() is not None:
                pytest.fail(f"training ended early ({proc.returncode}): {proc.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail("no second checkpoint write within 240 s")
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert json.loads((ckpts / "latest.json").read_text())["checkpoint"] == "step_00000004"
    assert not (ckpts / "step_00000008").exists()
    rc, out, err = cli(capsys, "--resume", tmp_path / "e2")
    assert rc == 0 and not err, err
    assert not notices(out)  # the hidden folder was never a checkpoint
    assert not list(ckpts.glob(".step_*"))  # cleaned up by the next checkpoint
    assert same_weights(tmp_path / "e2", finished[2])


# --- Ctrl-C ----------------------------------------------------------------------------------------


def test_ctrl_c_prints_the_resume_command_and_exits_130(finished, tmp_path, capsys, training_env):
    """SIGINT while a checkpoint is being written (slowed down): exit 130, one line with the
    exact resume command, no half-written checkpoint left; that command then finishes the run."""
    argv = [sys.executable, "-m", "surgeon_cli.app", "train", *TINY, "--epochs", "2",
            "--out", str(tmp_path), "--name", "e2"]  # fmt: skip
    env = subprocess_env(training_env, SURGEON_SLOW_CHECKPOINT="3")
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    ckpts = tmp_path / "e2" / "checkpoints"
    deadline = time.monotonic() + 240
    try:
        while not ((ckpts / "latest.json").is_file() and list(ckpts.glob(".step_00000008.*"))):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no second checkpoint write ({proc.poll()})")
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    (line,) = err.strip().splitlines()
    command = f"surgeon train --resume {tmp_path / 'e2'}"
    assert line.endswith(command), line
    assert not list(ckpts.glob(".step_*"))
    assert json.loads((ckpts / "latest.json").read_text())["checkpoint"] == "step_00000004"
    check_checkpoint(ckpts / "step_00000004", RUN_FIELDS)
    rc, _, err = cli(capsys, *command.split()[2:])
    assert rc == 0, err
    assert same_weights(tmp_path / "e2", finished[2])


# --- names -------------------------------------------------------------------------------------


TRAVERSAL = ["../../ESCAPED", "/tmp/ESCAPED-abs", "..", ".", "a/b", ".hidden", "x\ny", ""]


@pytest.mark.parametrize("name", TRAVERSAL[:-1])
def test_traversal_names_are_refused(tmp_path, capsys, name):
    out = tmp_path / "deep" / "runs"
    rc, _, err = cli(capsys, *TINY, "--out", out, "--name", name)
    assert rc == 2 and "invalid run name" in one_line_error(err)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'name = {json.dumps(name)}\n[base]\nmodel = "mlp"\n')
    rc, _, err = cli(capsys, "--recipe", recipe, "--out", out, "--epochs", "1")
    assert rc == 2 and "invalid recipe name" in one_line_error(err)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model": "mlp", "name": name}))
    rc, _, err = cli(capsys, "--config", config, "--out", out)
    assert rc == 2 and "invalid run name" in one_line_error(err)
    assert not (tmp_path / "ESCAPED").exists() and not Path("/tmp/ESCAPED-abs").exists()
    assert not out.exists()


def test_names_are_checked_in_the_python_api(tmp_path):
    for name in TRAVERSAL[:-1]:
        with pytest.raises(TrainError, match="invalid run name"):
            TrainConfig(name=name)
    with pytest.raises(TrainError, match="invalid seed"):
        TrainConfig(seed="../x")  # type: ignore[arg-type]
    bad = tmp_path / "seed.toml"
    bad.write_text('name = "ok"\n[grid]\nseed = ["../../x"]\n')
    with pytest.raises(TrainError, match="invalid seed"):
        load_recipe(str(bad))
    bad.write_text('name = "ok"\n[grid]\nvariant = ["../x"]\n')
    with pytest.raises(TrainError, match="unknown variant"):
        load_recipe(str(bad))


# --- results in a shared --out ----------------------------------------------------------------------


def test_results_merge_in_a_shared_out(tmp_path, capsys):
    for name in ("a", "b"):
        assert cli(capsys, *TINY, "--epochs", "1", "--out", tmp_path, "--name", name)[0] == 0
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [r["name"] for r in runs] == ["a", "b"]
    csv_rows = (tmp_path / "results.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in csv_rows[1:]] == ["a", "b"]
    before_b = runs[1]
    shutil.rmtree(tmp_path / "a")  # a rerun of a replaces its own row only
    assert cli(capsys, *TINY, "--epochs", "1", "--lr", "0.02", "--out", tmp_path, "--name", "a")[0] == 0  # fmt: skip
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [(r["name"], r["lr"]) for r in runs] == [("a", 0.02), ("b", 0.04)]
    assert runs[1] == before_b


def test_results_keep_recipe_order_then_the_others():
    old = [{"name": n, "v": 0} for n in ("z", "b", "y")]
    new = [{"name": "b", "v": 1}, {"name": "a", "v": 1}]
    merged = rundir.merge_results(old, new, order=["a", "b", "c"])
    assert [(r["name"], r["v"]) for r in merged] == [("a", 1), ("b", 1), ("z", 0), ("y", 0)]


def test_damaged_results_json_is_rebuilt_from_the_run_folders(finished, tmp_path):
    copy_run(finished[1], tmp_path)
    (tmp_path / "results.json").write_text("{garbled")
    rundir.write_results(tmp_path, "", [{"name": "new", "status": "ok"}], ["new"])
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [r["name"] for r in runs] == ["new", "e1"]


# --- divergence --------------------------------------------------------------------------------------


@pytest.mark.parametrize("every", [0, 1])
def test_a_diverged_single_run_exits_3_and_says_what_was_kept(tmp_path, capsys, every):
    argv = [*TINY, "--lr", "1e6", "--epochs", "1", "--out", tmp_path, "--name", "d"]
    rc, out, err = cli(capsys, *argv, "--checkpoint-every", str(every))
    assert rc == 3, err
    (line,) = err.strip().splitlines()
    assert line.startswith("diverged: d: non-finite loss at step")
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["message"] in line
    if every == 0:
        assert line.endswith("kept the initial weights")
    else:
        step = summary["diverged_at_step"] - 2
        assert line.endswith(f"kept the checkpoint of epoch 1 / step {step}")
        kept = tmp_path / "d" / "checkpoints" / f"step_{step:08d}" / "model.safetensors"
        assert weights(tmp_path / "d").keys() == load_file(str(kept)).keys()
        assert (tmp_path / "d" / "model.safetensors").read_bytes() == kept.read_bytes()
    assert not list((tmp_path / "d").glob(".*"))  # no temp file left by the restore


# --- the umask --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])  # fmt: skip
def test_every_file_and_folder_follows_the_umask(tmp_path, capsys, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        rc, _, err = cli(capsys, *TINY, "--epochs", "1", "--out", tmp_path / "runs", "--name", "u")
    finally:
        os.umask(old)
    assert rc == 0, err
    paths = [tmp_path / "runs", *(tmp_path / "runs").rglob("*")]
    assert len(paths) > 15
    for p in paths:
        mode = p.stat().st_mode & 0o777
        assert mode == (dir_mode if p.is_dir() else file_mode), (p, oct(mode))


# --- undecodable images ------------------------------------------------------------------------------


def test_a_fake_jpg_names_the_file_and_leaves_no_folder(tmp_path, capsys):
    from PIL import Image

    for split in ("train", "test"):
        (tmp_path / "data" / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / split / "cat" / "ok.png")
    fake = tmp_path / "data" / "train" / "cat" / "fake.jpg"
    fake.write_text("not a jpeg")
    out = tmp_path / "runs"
    rc, _, err = cli(capsys, "--model", "mlp", "--data", tmp_path / "data", "--out", out, "--quiet")
    assert rc == 2
    line = one_line_error(err)
    assert str(fake) in line and "BytesIO" not in line
    assert not out.exists()
