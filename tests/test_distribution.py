"""Bundles as model-zoo ships them: the inference workflow checked with no data (model-zoo CI's property check),
zips that ``python -m monai.bundle download`` unpacks and that then run, and ``--bundle`` names that resolve from
any folder with one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import pytest
from conftest import BUNDLES, shared_path
from monai.bundle import create_workflow, verify_metadata
from monai.bundle.properties import InferProperties, MetaProperties
from nnunet_v1 import nnunet_v1_container, save_nnunet_v1

from uniseg_monai.bundles import BundleNotFoundError, find_bundle, pack_bundle
from uniseg_monai.model_files import convert_official

NAMES = ["uniseg_pretrain", "uniseg_finetune_btcv", "uniseg_finetune_vs"]


def uniseg(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "uniseg_monai", *args], capture_output=True, text=True, cwd=cwd, env=env
    )


@pytest.mark.parametrize("name", NAMES)
def test_inference_workflow_passes_model_zoo_checks_without_data(name, tmp_path):
    """As model-zoo's ci/verify_bundle.py: create the inference workflow from the bundle with no data and no
    weights (dataset_dir does not exist), then check the inference properties."""
    bundle = BUNDLES / name
    workflow = create_workflow(
        workflow_type="inference",
        bundle_root=str(bundle),
        config_file=str(bundle / "configs" / "inference.json"),
        logging_file=str(bundle / "configs" / "logging.conf"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        dataset_dir=str(tmp_path / "no_data_here"),
    )
    workflow.properties = {**MetaProperties, **InferProperties}
    assert workflow.check_properties() == []
    assert workflow.dataset_data == []  # nothing to segment, and no error for it


@pytest.fixture(scope="module")
def zips(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    return {name: pack_bundle(BUNDLES / name, out) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_bundle_zip_has_the_github_release_layout(zips, name):
    version = json.loads((BUNDLES / name / "configs" / "metadata.json").read_text())["version"]
    assert zips[name].name == f"{name}_v{version}.zip"
    with zipfile.ZipFile(zips[name]) as archive:
        names = archive.namelist()
    assert all(n.startswith(f"{name}/") for n in names)
    assert f"{name}/configs/inference.json" in names and f"{name}/large_files.yml" in names
    assert f"{name}/LICENSE" in names and f"{name}/docs/README.md" in names
    assert not [n for n in names if n.endswith((".pt", ".pyc")) or "/eval/" in n]  # no weights, no run outputs


def test_downloaded_bundle_verifies_and_segments_a_real_scan(zips, official_fixture, tmp_path):
    """`monai.bundle download --url file://` unpacks the zip; its metadata verifies offline; `uniseg predict` with the
    unpacked bundle (by name, from $UNISEG_HOME) and a converted official model segments a real CT."""
    home = tmp_path / "home"
    run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "download", "--name", "uniseg_pretrain", "--bundle_dir",
         str(home / "bundles"), "--url", zips["uniseg_pretrain"].as_uri()],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    unpacked = home / "bundles" / "uniseg_pretrain"
    verify_metadata(
        meta_file=str(unpacked / "configs" / "metadata.json"),
        filepath=str(shared_path("schemas/meta_schema_20240725.json")),
    )
    weights = tmp_path / "weights" / "uniseg.pt"
    src = save_nnunet_v1(nnunet_v1_container(official_fixture["upstream_state_dict"]), tmp_path / "official.model")
    convert_official(src, weights)
    ct = shared_path("data/real_samples/totalseg_examples/ct_abdomen_3mm_crop.nii.gz")
    cwd = tmp_path / "cwd"  # no ./bundles here; the source tree's copy is hidden by naming a bundle only home has
    (unpacked.parent / "uniseg_home_copy").symlink_to(unpacked, target_is_directory=True)
    cwd.mkdir()
    env = {**os.environ, "UNISEG_HOME": str(home)}
    done = uniseg("predict", "-i", str(ct), "-o", "seg", "--task", "liver", "--bundle", "uniseg_home_copy",
                  "--checkpoint", str(weights), "--device", "cpu", cwd=cwd, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    sidecar = json.loads((cwd / "seg" / "ct_abdomen_3mm_crop_liver.json").read_text())
    assert sidecar["bundle"] == str((unpacked.parent / "uniseg_home_copy").resolve())
    seg, image = nib.load(cwd / "seg" / "ct_abdomen_3mm_crop_liver.nii.gz"), nib.load(ct)
    assert seg.shape == image.shape and (seg.affine == image.affine).all()


def test_bundle_names_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UNISEG_HOME", str(tmp_path / "home"))
    assert find_bundle("uniseg_pretrain").resolve() == (BUNDLES / "uniseg_pretrain").resolve()  # the source tree
    local = tmp_path / "bundles" / "uniseg_pretrain" / "configs"
    local.mkdir(parents=True)
    (local / "inference.json").write_text("{}")
    assert find_bundle("uniseg_pretrain") == Path("bundles") / "uniseg_pretrain"  # ./bundles/NAME comes first
    with pytest.raises(BundleNotFoundError, match="looked in") as err:
        find_bundle("no_such_bundle")
    assert str(tmp_path / "home" / "bundles" / "no_such_bundle") in str(err.value)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["predict", "-i", "X", "-o", "seg", "--task", "liver", "--bundle", "no_such_bundle"], "looked in"),
        (["predict", "-i", "X", "-o", "seg", "--task", "liver", "--bundle", "BUNDLE"], "uniseg weights --bundle"),
        (["predict", "-i", "X", "-o", "seg", "--task", "nope", "--checkpoint", "WEIGHTS"], "unknown task 'nope'"),
        (["predict", "-i", "X", "-o", "seg", "--task", "liver", "--checkpoint", "WEIGHTS", "--no_id", "1"], "no_id"),
        (["weights", "--bundle", "no_such_bundle"], "looked in"),
        (["weights", "--bundle", "BUNDLE", "--url", "/no/such/file.model"], "not found"),
        (["convert-official", "/no/such/file.model", "out.pt"], "not found"),
        (["export", "--bundle", "BUNDLE", "--onnx", "x.onnx"], "uniseg weights --bundle"),
    ],
)
def test_user_errors_are_one_line(official_fixture, tmp_path, args, expected):
    """Every user error of predict, weights, convert-official and export: exit 2, one line naming the fix."""
    bundle = shutil.copytree(BUNDLES / "uniseg_pretrain", tmp_path / "bundle")
    weights = tmp_path / "weights.pt"
    src = save_nnunet_v1(nnunet_v1_container(official_fixture["upstream_state_dict"]), tmp_path / "official.model")
    convert_official(src, weights)
    scan = shared_path("data/real_samples/totalseg_examples/ct_abdomen_3mm_crop.nii.gz")
    swap = {"X": str(scan), "BUNDLE": str(bundle), "WEIGHTS": str(weights)}
    run = uniseg(*[swap.get(a, a) for a in args], cwd=tmp_path)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("uniseg: error:") and expected in lines[0], run.stderr[-2000:]
