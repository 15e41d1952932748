"""The benchmarks' code paths that CI keeps alive: the GPU check's CPU path (tiny network, a real CT cut small)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import pytest
import torch
from conftest import shared_path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.integration
def test_the_gpu_check_runs_on_the_cpu_and_prints_one_table(tmp_path, capsys, monkeypatch):
    ct = nib.load(shared_path("data/real_samples/totalseg_examples/ct_abdomen_3mm_crop.nii.gz"))
    nib.save(ct.slicer[40:64, 30:54, 8:24], tmp_path / "ct.nii.gz")  # 24x24x16 voxels of 3 mm
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_check

    gpu_check.main(["--cpu", "--tiny", str(tmp_path / "ct.nii.gz")])
    torch._dynamo.reset()
    table = capsys.readouterr().out.split("\n\n")[-1].strip().splitlines()
    assert table[:2] == ["| measurement | ours | reference |", "|---|---|---|"]
    steps, window, predict = table[2:5], table[5], table[6]
    assert [r.split(" | ")[0] for r in steps] == [f"| training step, {m}" for m in list(gpu_check.MODES)[:3]]
    assert all(" s/it (first step " in r for r in steps) and "0.17 s/it (A100)" in steps[2]
    assert "one window, 11 tasks: all-task vs per-task loop" in window and "ratio" in window
    assert "`uniseg predict --device cpu`, ct.nii.gz, liver" in predict and "inference" in predict
    assert len(table) == 7
