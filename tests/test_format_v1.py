"""Folders saved by fx-surgeon 0.1.0 before the record became typed still load, bit for bit.

``tests/data/format_v1`` was written by the code of commit 4ca1e5b (an FX insert, a
batchnorm + fused insert + fuse_relu chain, and batchnorm + replace_norm + insert + fold),
with the outputs of each model on fixed inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import surgeon

DATA = Path(__file__).parent / "data" / "format_v1"
CASES = {
    "mlp_channel_layer": "input8",
    "allconv_bn_fused": "input16",
    "allconv_replace_fold": "input16",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_old_folder_loads_with_identical_outputs(name):
    expected = load_file(str(DATA / "expected.safetensors"))
    model = surgeon.load(DATA / name).eval()
    with torch.no_grad():
        out = model(expected[CASES[name]])
    assert torch.equal(out, expected[name])


def test_old_record_reads_as_typed_record():
    from surgeon.io import read_record
    from surgeon.record import SurgeryRecord

    rec = read_record(DATA / "allconv_replace_fold")
    assert isinstance(rec, SurgeryRecord)
    assert [p.name for p in rec.passes] == ["batchnorm", "replace_norm", "shift_scale", "fold"]
    assert len(rec.sites) == 9
    assert any(s.folded_into for s in rec.sites) and any(s.scale_folded_into for s in rec.sites)
    # the typed record writes back exactly what it read
    saved = json.loads((DATA / "allconv_replace_fold" / "surgery.json").read_text())
    meta = ("format", "format_version", "versions", "training")
    assert rec.to_dict() == {k: v for k, v in saved.items() if k not in meta}
