"""`surgeon train --resume`: a finished run says so; a grid's folder resumes every
unfinished run inside it."""

from __future__ import annotations

import pytest
from surgeon_cli.app import main

pytestmark = pytest.mark.usefixtures("training_env")
TINY = ["--model", "mlp", "--data", "sample", "--limit-train", "200", "--limit-test", "100",
        "--device", "cpu", "--quiet"]  # fmt: skip


def test_resume_of_finished_and_unfinished_runs(tmp_path, capsys) -> None:
    out = tmp_path / "runs"
    for name in ("a", "b"):
        assert main(["train", *TINY, "--epochs", "1", "--out", str(out), "--name", name]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out / "a")]) == 0
    assert "a: finished (1 epoch); nothing to do" in capsys.readouterr().out
    assert main(["train", "--resume", str(out), "--epochs", "2", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert text.count("epoch 2/2") == 2 and "nothing to do" not in text
    (tmp_path / "empty").mkdir()
    assert main(["train", "--resume", str(tmp_path / "empty")]) == 2  # no runs inside


def test_resuming_a_run_built_from_a_model_file_needs_trust(tmp_path, capsys, monkeypatch) -> None:
    (tmp_path / "tiny.py").write_text(
        "from torch import nn\n\n\nclass Net(nn.Module):\n"
        "    def __init__(self, num_classes=10):\n        super().__init__()\n"
        "        self.fc = nn.Linear(3 * 32 * 32, num_classes)\n\n"
        "    def forward(self, x):\n        return self.fc(x.flatten(1))\n"
    )
    monkeypatch.chdir(tmp_path)
    args = ["train", *TINY, "--model", "tiny.py", "--batch-size", "50", "--epochs", "1"]
    assert main([*args, "--out", "runs", "--name", "t"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "runs/t", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "builds its model from tiny.py" in err and "--trust-code" in err
    assert main(["train", "--resume", "runs/t", "--epochs", "2", "--trust-code", "--quiet"]) == 0


def test_variant_by_name_for_a_single_run(tmp_path, capsys) -> None:
    args = ["train", *TINY, "--epochs", "1", "--out", str(tmp_path), "--dry-run"]
    assert main([*args, "--variant", "batchnorm+scale-channel"]) == 0
    assert "batchnorm+scale-channel" in capsys.readouterr().out
    assert main([*args, "--variant", "bogus"]) == 2
    assert main([*args, "--variant", "plain", "--shift", "layer"]) == 2
    assert "cannot be combined with --shift" in capsys.readouterr().err
