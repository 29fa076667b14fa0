"""transformers vision models from a model file, end to end through the command line:
`surgeon insert`, `surgeon train` (the embedded sample, one short epoch) and `surgeon fold`
of the trained run, for each family issue 20 names.

    python benchmarks/foreign_e2e.py [--csv FILE] [--models ViT,Swin]

Each model is built from a small config at 32x32 (random weights, 10 labels), so the whole
sweep runs on a CPU in minutes. Per model: the insert's method, sites and identity at init,
the training status, and the fold's folded/kept counts and max |output difference|.
Writes benchmarks/results/foreign_e2e.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CSV = Path(__file__).parent / "results" / "foreign_e2e.csv"
# name: (config class, model class, small config arguments)
SMALL = "num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64"
MODELS = {
    "ViT": ("ViTConfig", "ViTForImageClassification", f"image_size=32, patch_size=8, {SMALL}"),
    "DeiT": ("DeiTConfig", "DeiTForImageClassification", f"image_size=32, patch_size=8, {SMALL}"),
    "BEiT": ("BeitConfig", "BeitForImageClassification", f"image_size=32, patch_size=8, {SMALL}"),
    "DINOv2": ("Dinov2Config", "Dinov2ForImageClassification", f"image_size=32, patch_size=8, {SMALL}"),
    "ConvNeXt": ("ConvNextConfig", "ConvNextForImageClassification",
                 "image_size=32, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2"),
    "ConvNeXtV2": ("ConvNextV2Config", "ConvNextV2ForImageClassification",
                   "image_size=32, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2"),
    "Swin": ("SwinConfig", "SwinForImageClassification",
             "image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=2"),
    "Swinv2": ("Swinv2Config", "Swinv2ForImageClassification",
               "image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=2"),
    "MobileViT": ("MobileViTConfig", "MobileViTForImageClassification",
                  "image_size=32, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64]"),
    "SegFormer": ("SegformerConfig", "SegformerForImageClassification",
                  "num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], "
                  "num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2]"),
    "ResNet": ("ResNetConfig", "ResNetForImageClassification",
               "embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type='basic'"),
    "RegNet": ("RegNetConfig", "RegNetForImageClassification",
               "embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8"),
    "EfficientNet": ("EfficientNetConfig", "EfficientNetForImageClassification",
                     "image_size=32, width_coefficient=0.5, depth_coefficient=0.25, hidden_dim=640"),
}  # fmt: skip


def model_file(cfg_cls: str, model_cls: str, args: str) -> str:
    return (
        "import transformers\n\n\ndef build_model(num_classes=10):\n"
        f"    cfg = transformers.{cfg_cls}({args}, num_labels=num_classes)\n"
        f"    return transformers.{model_cls}(cfg)\n"
    )


def surgeon(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "surgeon_cli.app", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)


def one(name: str, spec: tuple[str, str, str], root: Path) -> dict:
    folder = root / name
    folder.mkdir()
    (folder / "model.py").write_text(model_file(*spec))
    row: dict = {"model": name}
    t0 = time.perf_counter()
    ins = surgeon(
        "insert", "model.py", "--input-size", "3,32,32", "--json", "-o", "ins", cwd=folder
    )
    if ins.returncode != 0:
        return {**row, "status": "insert failed", "error": ins.stderr.strip()[-300:]}
    summary = json.loads(ins.stdout)
    row.update(method=summary["method"], sites=len(summary["sites"]),
               max_abs_diff_at_init=summary["max_abs_diff_at_init"],
               traced_with_decisions=(summary.get("traced_with") or {}).get("decisions", 0))  # fmt: skip
    train = surgeon("train", "--model", "model.py", "--trust-code", "--data", "sample",
                    "--limit-train", "200", "--limit-test", "100", "--batch-size", "50",
                    "--epochs", "1", "--device", "cpu", "--out", "runs", "--name", "r",
                    "--quiet", cwd=folder)  # fmt: skip
    if train.returncode != 0:
        return {**row, "status": "train failed", "error": train.stderr.strip()[-300:]}
    fold = surgeon("fold", "runs/r", "-o", "folded", "--trust-code", "--json", cwd=folder)
    if fold.returncode != 0:
        return {**row, "status": "fold failed", "error": fold.stderr.strip()[-300:]}
    report = json.loads(fold.stdout)
    row.update(folded=report["folded"], scale_folded=report["scale_folded"], kept=report["kept"],
               fold_max_abs_diff=report["max_abs_diff"], fold_max_abs_output=report["max_abs_output"],
               fold_exact=report["exact"], status="ok",
               time_s=round(time.perf_counter() - t0, 1))  # fmt: skip
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv", type=Path, default=CSV)
    ap.add_argument("--models", default="", help="comma-separated names (default: all)")
    args = ap.parse_args()
    names = [n for n in args.models.split(",") if n] or list(MODELS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            row = one(name, MODELS[name], Path(tmp))
            print(json.dumps(row), flush=True)
            rows.append(row)
    fields = ["model", "status", "method", "sites", "max_abs_diff_at_init",
              "traced_with_decisions", "folded", "scale_folded", "kept", "fold_max_abs_diff",
              "fold_max_abs_output", "fold_exact", "time_s", "error"]  # fmt: skip
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"{ok}/{len(rows)} through insert, train and fold; {args.csv}")


if __name__ == "__main__":
    main()
