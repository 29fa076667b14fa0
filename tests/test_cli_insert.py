"""``surgeon insert``: typer's CliRunner for the command, ``main()`` for the exit codes,
and one real subprocess call of the installed console script.

``main()`` is what the console script runs: it turns a :class:`SurgeonError` into one line
on stderr and exit code 2. ``CliRunner.invoke(app, ...)`` runs the typer app without
``main()``, so there an error surfaces as the exception itself (exit code 1); the error
cases are therefore checked through ``main([...])``, and the runner checks that the app
raises a :class:`SurgeonError` (never a bare traceback) for the same inputs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from surgeon_cli.app import app, main, run
from typer.testing import CliRunner

import surgeon
from surgeon import SurgeonError

pytestmark = pytest.mark.usefixtures("seeded", "one_thread")

JSON_KEYS = {"model", "shift", "scale", "sites", "params_added", "max_abs_diff_at_init"}
SITE_KEYS = {"name", "kind", "target", "shape", "shift_params", "scale_params"}


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str):
    result = runner.invoke(app, ["insert", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def one_json_object(stdout: str) -> dict:
    """stdout must be exactly one JSON object (one line) and nothing else."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert len(lines) == 1, stdout
    obj = json.loads(lines[0])
    assert isinstance(obj, dict)
    return obj


# ---------------------------------------------------------------- success


def test_table_and_summary_for_allconv(runner) -> None:
    result = invoke(runner, "allconv")
    assert result.exit_code == 0
    out = result.stdout
    for name in ("x", "features_1", "features_17", "nn.ReLU", "N×96×32×32"):
        assert name in out
    assert "9 sites, 18 parameters added" in out
    assert "max |Δoutput| at init: 0 (identity)" in out


def test_json_is_exactly_one_object_with_the_documented_keys(runner) -> None:
    result = invoke(runner, "allconv", "--shift", "channel", "--scale", "element", "--json")
    assert result.exit_code == 0
    obj = one_json_object(result.stdout)
    assert set(obj) >= JSON_KEYS
    assert (obj["model"], obj["shift"], obj["scale"]) == ("allconv", "channel", "element")
    assert obj["max_abs_diff_at_init"] == 0.0
    assert [s["name"] for s in obj["sites"]][:2] == ["x", "features_1"]
    assert all(set(s) >= SITE_KEYS for s in obj["sites"])
    first = obj["sites"][1]
    assert (first["kind"], first["target"], first["shape"]) == (
        "activation",
        "nn.ReLU",
        [-1, 96, 32, 32],
    )
    assert (first["shift_params"], first["scale_params"]) == (96, 96 * 32 * 32)
    assert obj["params_added"] == sum(s["shift_params"] + s["scale_params"] for s in obj["sites"])


def test_output_folder_holds_the_three_files_and_loads(runner, tmp_path) -> None:
    out = tmp_path / "out"
    result = invoke(runner, "mlp", "--model-arg", "hidden=[8, 4]", "--model-arg",
                    "input_size=[3, 4, 4]", "--shift", "layer", "-o", str(out))  # fmt: skip
    assert result.exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "model.safetensors", "model_fx.py", "surgery.json",
    ]  # fmt: skip
    assert "saved to" in result.stdout
    loaded = surgeon.load(out)
    args = {"hidden": [8, 4], "input_size": [3, 4, 4]}
    assert loaded.surgeon_record.to_dict()["source"] == {"spec": "mlp", "args": args}
    assert list(surgeon.inserted_modules(loaded)) == ["ss_x", "ss_layers_3", "ss_layers_5"]


def test_include_exclude_and_leaf_options(runner, models_dir) -> None:
    only = one_json_object(invoke(runner, "allconv", "--include", "input", "--json").stdout)
    assert [s["name"] for s in only["sites"]] == ["x"]
    rest = invoke(runner, "allconv", "--exclude", "input", "--exclude", "features_1*", "--json")
    assert [s["name"] for s in one_json_object(rest.stdout)["sites"]] == [
        "features_3", "features_5", "features_8",
    ]  # fmt: skip
    leaf = invoke(
        runner, str(models_dir / "untraceable.py"), "--leaf", "DataDependentGate", "--json"
    )
    assert [s["name"] for s in one_json_object(leaf.stdout)["sites"]] == ["x", "act"]


@pytest.mark.parametrize(
    "name",
    ["ModuleActs", "FunctionActs", "MethodActs", "TimmActs", "NormAct", "Branching",
     "ModuleListLoop", "SoftmaxHead", "SigmoidHead", "ReluThenPool", "SqueezeExcite",
     "SiluWrittenOut", "ConvNeXtBlock", "PermutedRelu", "TokenMLP"],
)  # fmt: skip
def test_layer_layer_works_on_every_model_style(runner, models_dir, name) -> None:
    result = invoke(runner, f"{models_dir / 'forms.py'}:{name}", "--shift", "layer",
                    "--scale", "layer", "--json")  # fmt: skip
    obj = one_json_object(result.stdout)
    assert result.exit_code == 0 and obj["max_abs_diff_at_init"] == 0.0
    assert len(obj["sites"]) >= 2


@pytest.mark.parametrize(
    ("file", "args", "sites"),
    [
        ("single_class.py", [], ["x", "act1", "act2"]),
        (
            "factory.py",
            ["--model-arg", "width=3", "--model-arg", "depth=1"],
            ["x", "relu", "relu_1"],
        ),
        ("object_model.py", [], ["input_1", "_2"]),
    ],
)
def test_model_files_of_every_kind(runner, models_dir, file, args, sites) -> None:
    result = invoke(runner, str(models_dir / file), *args, "--json")
    obj = one_json_object(result.stdout)
    assert [s["name"] for s in obj["sites"]] == sites
    assert obj["max_abs_diff_at_init"] == 0.0


def test_no_sites_is_a_warning_and_exit_0(runner, models_dir, capsys) -> None:
    spec = str(models_dir / "no_sites.py")
    result = invoke(runner, spec, "--exclude", "input", "--json")
    assert result.exit_code == 0
    obj = one_json_object(result.stdout)
    assert obj["sites"] == [] and obj["params_added"] == 0
    assert "warning: no sites found" in result.stderr
    assert main(["insert", spec, "--exclude", "input"]) == 0
    assert "warning: no sites found" in capsys.readouterr().err


def test_convnext_tiny_reports_every_activation_channels_last(runner) -> None:
    """The issue's own command: one correct site per GELU, channel dim 3 (N, H, W, C)."""
    result = invoke(
        runner, "timm:convnext_tiny", "--shift", "channel", "--scale", "channel", "--json"
    )
    obj = one_json_object(result.stdout)
    expected = []  # ConvNeXt-T: dims 96/192/384/768, depths 3/3/9/3, MLP ratio 4, 224 px
    for i, (dim, depth) in enumerate(zip((96, 192, 384, 768), (3, 3, 9, 3), strict=True)):
        side = 56 // 2**i
        for j in range(depth):
            expected.append((f"stages_{i}_blocks_{j}_mlp_act", [-1, side, side, 4 * dim], 4 * dim))
    sites = obj["sites"]
    assert sites[0]["name"] == "x" and sites[0]["shift_params"] == 3
    got = [(s["name"], s["shape"], s["shift_params"]) for s in sites[1:]]
    assert got == expected and len(got) == 18
    assert all(s["channel_dim"] == 3 and s["kind"] == "activation" for s in sites[1:])
    assert all(s["scale_params"] == s["shift_params"] for s in sites)
    assert obj["max_abs_diff_at_init"] == 0.0


# ---------------------------------------------------------------- errors: one line, exit 2


def bad_input_cases(models_dir: Path, tmp_path: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (argv after ``insert``, substrings the error line must contain)."""
    syntax = tmp_path / "broken.py"
    syntax.write_text("import torch\n\nclass Net(torch.nn.Module:\n    pass\n")
    crash = tmp_path / "crash.py"
    crash.write_text("import torch\n\nraise RuntimeError('boom')\n")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    untraceable = models_dir / "untraceable.py"
    line = next(
        i
        for i, text in enumerate(untraceable.read_text().splitlines(), 1)
        if "x.mean() > 0" in text
    )
    functional = models_dir / "untraceable_functional.py"
    fline = next(
        i for i, text in enumerate(functional.read_text().splitlines(), 1) if "x.mean() > 0" in text
    )
    return {
        "missing file": ([str(tmp_path / "nope.py")], ["model file not found", "nope.py"]),
        "syntax error": ([str(syntax)], [f"{syntax}:3", "syntax error"]),
        "import error": ([str(crash)], [f"{crash}:3", "boom"]),
        "no model": ([str(models_dir / "no_model.py")], ["no model found", "no nn.Module class"]),
        "two models": (
            [str(models_dir / "two_classes.py")],
            [
                "2 nn.Module classes that no other class uses",
                "two_classes.py:A",
                "two_classes.py:B",
            ],
        ),
        "missing attribute": ([f"{models_dir / 'forms.py'}:Nope"], ["no attribute 'Nope'"]),
        "factory fails": (
            [str(models_dir / "build_fails.py")],
            ["building", f"{models_dir / 'build_fails.py'}:7", "RuntimeError"],
        ),
        "unknown timm": (["timm:resnet_5"], ["unknown timm model 'resnet_5'", "did you mean"]),
        "unknown torchvision": (
            ["torchvision:resnet_5"],
            ["unknown torchvision model 'resnet_5'", "did you mean"],
        ),
        "unknown spec": (["nosuchmodel"], ["unknown model 'nosuchmodel'", "timm:NAME"]),
        "bare timm name": (
            ["resnet18"],
            ["unknown model 'resnet18'", "did you mean timm:resnet18"],
        ),
        "untraceable": (
            [str(untraceable), "--fallback", "never"],
            ["cannot trace Untraceable", f"untraceable.py:{line}", "control flow", "--leaf"],
        ),
        "untraceable, fallback reaches nothing": (
            [str(functional)],  # --fallback auto is the default
            [
                "cannot trace Untraceable",
                f"untraceable_functional.py:{fline}",
                "control flow",
                "reaches none of its 1 activation calls",
                "--leaf",
                "cannot reach activation functions",
            ],
        ),
        "invalid shift": (["allconv", "--shift", "channels"], ["invalid shift mode 'channels'"]),
        "invalid scale": (
            ["allconv", "--scale", "Layer"],
            ["invalid scale mode 'Layer'", "element"],
        ),
        "bad model arg": (["allconv", "--model-arg", "width"], ["bad --model-arg 'width'"]),
        "unknown model arg": (
            ["allconv", "--model-arg", "depth=3"],
            ["cannot build allconv", "depth"],
        ),
        "bad input size": (["allconv", "--input-size", "3,a,32"], ["bad input size"]),
        "wrong input size": (["mlp", "--input-size", "3,8,8"], ["shape propagation failed"]),
        "unknown leaf": (["allconv", "--leaf", "Nope"], ["--leaf 'Nope'"]),
        "output not a model folder": (["allconv", "-o", str(other)], ["refusing to write into"]),
    }


CASES = [
    "missing file", "syntax error", "import error", "no model", "two models",
    "missing attribute", "factory fails", "unknown timm", "unknown torchvision", "unknown spec", "bare timm name", "untraceable",
    "untraceable, fallback reaches nothing",
    "invalid shift", "invalid scale", "bad model arg", "unknown model arg", "bad input size",
    "wrong input size", "unknown leaf", "output not a model folder",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line_and_a_hint(case, models_dir, tmp_path, capsys) -> None:
    argv, needles = bad_input_cases(models_dir, tmp_path)[case]
    assert main(["insert", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    line = lines[0]
    assert line.startswith("error: ") and "hint: " in line
    for needle in needles:
        assert needle in line


def test_every_case_is_run(models_dir, tmp_path) -> None:
    assert sorted(CASES) == sorted(bad_input_cases(models_dir, tmp_path))


@pytest.mark.parametrize("case", ["missing file", "unknown timm", "untraceable", "invalid shift"])
def test_the_typer_app_raises_surgeon_errors(runner, case, models_dir, tmp_path) -> None:
    argv, _ = bad_input_cases(models_dir, tmp_path)[case]
    result = runner.invoke(app, ["insert", *argv])
    assert isinstance(result.exception, SurgeonError)


def test_untraceable_model_names_the_tracers_reason_and_the_users_line(models_dir, capsys):
    """With ``--fallback never`` this is the exit-2 error of ``test_bad_input_exits_2...``;
    by default (``--fallback auto``) the command goes on at module level (the eager fallback)
    and its one-line warning still gives the tracer's reason and the user's file:line."""
    path = models_dir / "untraceable.py"
    line = next(
        i for i, text in enumerate(path.read_text().splitlines(), 1) if "x.mean() > 0" in text
    )
    assert main(["insert", str(path), "--json", "--fallback", "never"]) == 2
    capsys.readouterr()
    assert main(["insert", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    assert one_json_object(captured.out)["max_abs_diff_at_init"] == 0.0
    err = " ".join(captured.err.split())
    for needle in ("cannot trace Untraceable", f"untraceable.py:{line}", "control flow", "eager"):
        assert needle in err
    assert main(["insert", str(path), "--leaf", "DataDependentGate", "--json"]) == 0
    assert [s["name"] for s in one_json_object(capsys.readouterr().out)["sites"]] == ["x", "act"]


def test_debug_env_shows_the_traceback(monkeypatch) -> None:
    monkeypatch.setenv("SURGEON_DEBUG", "1")
    with pytest.raises(SurgeonError, match="invalid shift mode"):
        main(["insert", "allconv", "--shift", "x"])


def test_usage_errors_exit_2(capsys) -> None:
    assert main(["insert"]) == 2  # missing MODEL: click's usage error, as one line
    assert capsys.readouterr().err == (
        "error: missing argument 'MODEL'. hint: see `surgeon insert --help`\n"
    )


def test_run_exits_with_the_code_of_main(monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["surgeon", "insert", "timm:resnet_5"])
    with pytest.raises(SystemExit) as exc:
        run()
    assert exc.value.code == 2


def test_console_script_in_a_real_subprocess(models_dir, tmp_path) -> None:
    exe = shutil.which("surgeon")
    assert exe, "the console script is not installed: pip install -e ."
    out = tmp_path / "saved"
    proc = subprocess.run(
        [exe, "insert", str(models_dir / "single_class.py"), "--shift", "channel", "--json",
         "-o", str(out)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    obj = one_json_object(proc.stdout)
    assert [s["name"] for s in obj["sites"]] == ["x", "act1", "act2"]
    assert obj["max_abs_diff_at_init"] == 0.0
    assert sorted(p.name for p in out.iterdir()) == [
        "model.safetensors", "model_fx.py", "surgery.json",
    ]  # fmt: skip


def test_the_root_class_of_a_model_file_is_the_one_nothing_uses(models_dir) -> None:
    model = surgeon.build_model(str(models_dir / "block_and_net.py"), {"num_classes": 4})
    assert type(model).__name__ == "Net"
    sites = surgeon.find_sites(model)
    assert [s.name for s in sites] == ["x", "stage_0_act", "stage_1_act"]
