"""``uniseg predict`` on the phantoms with a tiny model trained for one epoch through the pretrain bundle: input
syntax; geometry of file, folder, multi-channel, NRRD and DICOM inputs; ``--task all`` equal to per-task passes;
bad inputs, refused output folders and interrupted writes."""

from __future__ import annotations

import json
import locale
import re
import shutil
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import PREDICT_BUNDLE, PREDICT_TINY, shared_path
from monai.transforms import Activationsd, AsDiscreted, Compose, Invertd
from network_outputs import assert_equal_but_near_ties

from uniseg_monai.apps import predict as predict_module
from uniseg_monai.apps.predict import Predictor, find_cases, predict, predict_config
from uniseg_monai.core.errors import InputError

BUNDLE, TINY = PREDICT_BUNDLE, PREDICT_TINY
ORGANS = {"0": "background", "1": "liver", "2": "spleen"}


def image(phantoms: Path, kind: str, case: int, channel: str = "ct") -> Path:
    """A testing phantom (cases 8 and 9; odd cases are stored LPS)."""
    return phantoms.parent / kind / f"{kind}_{case:03d}_{channel}.nii.gz"


@pytest.fixture(scope="module")
def model(predict_model) -> Path:
    """The session's tiny trained model (conftest ``predict_model``)."""
    return predict_model


def run(model: Path, inputs, out: Path, task: str, **kwargs) -> int:
    return predict(inputs, str(out), task, bundle=str(BUNDLE), checkpoint=str(model), device="cpu", **TINY, **kwargs)


@pytest.fixture(scope="module")
def organs(model, phantoms, tmp_path_factory) -> tuple[Path, Path]:
    """``--task ph_organs`` on a folder holding a RAS and an LPS CT; returns the input and the output folder."""
    folder = tmp_path_factory.mktemp("organs_in")
    for case in (8, 9):
        shutil.copy(image(phantoms, "abdomen", case), folder)
    out = tmp_path_factory.mktemp("organs_out")
    assert run(model, str(folder), out, "ph_organs") == 0
    return folder, out


@pytest.fixture()
def small(phantoms, tmp_path) -> dict[str, Path]:
    """Crops (one sliding window) of the RAS and the LPS CT phantom, for the cheap tests."""
    crops = {}
    for name, case in (("ras", 8), ("lps", 9)):
        crops[name] = tmp_path / f"small_{name}.nii.gz"
        nib.save(nib.load(image(phantoms, "abdomen", case)).slicer[24:72, 24:72, 10:30], crops[name])
    return crops


def check_output(out: Path, case: str, task: str, source: Path, labels: dict, inputs: list[str], model: Path):
    """Asserts the map's geometry is the source's and the sidecar's content; returns the map (X, Y, Z)."""
    pred, src = nib.load(out / f"{case}_{task}.nii.gz"), nib.load(source)
    assert pred.shape == src.shape[:3] and pred.get_data_dtype() == np.uint8
    np.testing.assert_allclose(pred.affine, src.affine, atol=1e-4)
    assert nib.aff2axcodes(pred.affine) == nib.aff2axcodes(src.affine)
    assert np.asarray(pred.dataobj).max() < len(labels)
    sidecar = json.loads((out / f"{case}_{task}.json").read_text())
    assert sidecar["task"] == task and sidecar["labels"] == labels and sidecar["input"] == inputs
    assert sidecar["checkpoint"] == str(model.resolve()) and sidecar["bundle"] == str(BUNDLE.resolve())
    assert list(sidecar["timings_s"]) == ["load", "preprocess", "inference", "postprocess", "write"]
    return np.asarray(pred.dataobj)


def test_input_syntax(tmp_path):
    for name in ("a.nii.gz", "b.nrrd", "c.mha", "notes.txt", ".hidden.nii.gz"):
        (tmp_path / name).touch()
    (tmp_path / "dicom").mkdir()
    (tmp_path / "dicom" / "IM0001").touch()
    a, b, c = (str(tmp_path / n) for n in ("a.nii.gz", "b.nrrd", "c.mha"))
    assert find_cases(str(tmp_path)) == {
        "a": (a, [Path(a)]),
        "b": (b, [Path(b)]),
        "c": (c, [Path(c)]),
        "dicom": (str(tmp_path / "dicom"), [tmp_path / "dicom" / "IM0001"]),  # a sub-folder is a DICOM series
    }
    assert find_cases(str(tmp_path / "dicom")) == {"dicom": (str(tmp_path / "dicom"), [tmp_path / "dicom" / "IM0001"])}
    assert "dicom" not in find_cases(str(tmp_path), exclude=tmp_path / "dicom")  # the output folder is no case
    assert (
        find_cases(f"{a},{b}+{c}")
        == find_cases([a, f"{b}+{c}"])
        == {
            "a": (a, [Path(a)]),
            "b": ([b, c], [Path(b), Path(c)]),  # one case, one file per channel, named after the first
        }
    )
    with pytest.raises(ValueError, match="two inputs make the case 'a'"):
        find_cases([a, str(tmp_path)])
    with pytest.raises(FileNotFoundError, match=r"missing\.nii\.gz"):
        find_cases(f"{a}+{tmp_path / 'missing.nii.gz'}")
    for entry in (f"{a}+", f"+{a}", f"{a}++{a}"):
        with pytest.raises(InputError, match=re.escape(f"input {entry}: the channel list (a+b) has an empty entry")):
            find_cases(entry)


def test_windows_run_on_the_device_and_are_stitched_on_the_cpu(model):
    parser, _ = predict_config(str(BUNDLE), str(model), "ph_liver", {"device": "$torch.device('cuda')"}, True)
    for key in ("inferer", "all_inferer"):
        window = parser.get_parsed_content(key).window
        assert (window.sw_device, window.device, window.progress) == (torch.device("cuda"), torch.device("cpu"), True)
    steps = parser.get_parsed_content("postprocessing").transforms
    assert [type(t).__name__ for t in steps] == ["InvertArgmaxd"]  # no SaveImaged


def test_files_folders_and_channels_keep_the_input_geometry(model, organs, phantoms, tmp_path):
    folder, out = organs
    for case, axes in ((8, ("R", "A", "S")), (9, ("L", "P", "S"))):
        source = image(phantoms, "abdomen", case)
        assert nib.aff2axcodes(nib.load(source).affine) == axes
        check_output(out, f"abdomen_00{case}_ct", "ph_organs", source, ORGANS, [str(folder / source.name)], model)
    assert len(list(out.iterdir())) == 4  # 2 maps, 2 sidecars, no temporary file

    ct, pet = image(phantoms, "petct", 9), image(phantoms, "petct", 9, "pet")
    assert run(model, f"{ct}+{pet}", tmp_path / "petct", "ph_petct") == 0
    lesion = {"0": "background", "1": "lesion"}
    check_output(tmp_path / "petct", "petct_009_ct", "ph_petct", ct, lesion, [str(ct), str(pet)], model)


@pytest.mark.exactness
def test_all_tasks_in_one_pass_equal_the_single_task_maps(model, organs, phantoms, tmp_path, capsys):
    ct = image(phantoms, "abdomen", 9)
    assert run(model, str(ct), tmp_path / "all", "all") == 0
    stems = {"abdomen_009_ct_" + s for s in ("ph_organs", "ph_liver", "all_merged")}  # no brain / petct: channels
    assert {p.name for p in (tmp_path / "all").iterdir()} == {s + e for s in stems for e in (".nii.gz", ".json")}
    assert run(model, str(ct), tmp_path / "liver", "ph_liver") == 0
    maps = {}
    for task, single in (("ph_organs", organs[1]), ("ph_liver", tmp_path / "liver")):
        expected = np.asarray(nib.load(single / f"abdomen_009_ct_{task}.nii.gz").dataobj)
        labels = json.loads((single / f"abdomen_009_ct_{task}.json").read_text())["labels"]
        maps[task] = check_output(tmp_path / "all", "abdomen_009_ct", task, ct, labels, [str(ct)], model)
        assert len(np.unique(expected)) > 1  # a non-trivial map
        # the all-task pass sums partial convolutions: equal logits to float rounding, so equal maps but near-ties
        assert_equal_but_near_ties(maps[task], expected, input_grid_probabilities(model, ct, task))

    merged = nib.load(tmp_path / "all" / "abdomen_009_ct_all_merged.nii.gz")
    np.testing.assert_allclose(merged.affine, nib.load(ct).affine, atol=1e-4)
    organ_map, liver_map = maps["ph_organs"], maps["ph_liver"]
    np.testing.assert_array_equal(np.asarray(merged.dataobj), np.where(liver_map > 0, liver_map + 2, organ_map))
    table = json.loads((tmp_path / "all" / "abdomen_009_ct_all_merged.json").read_text())["labels"]
    assert [(k, v["task"], v["name"]) for k, v in table.items()] == [
        ("0", None, "background"),
        ("1", "ph_organs", "liver"),
        ("2", "ph_organs", "spleen"),
        ("3", "ph_liver", "liver"),
        ("4", "ph_liver", "liver tumour"),
    ]

    capsys.readouterr()  # --modality narrows "all": only the CT+PET task is left, which a 1-channel CT cannot feed
    assert run(model, str(ct), tmp_path / "pet", "all", modality="pet") == 1
    assert "ph_petct takes CT+PET" in capsys.readouterr().err and not (tmp_path / "pet").exists()


def input_grid_probabilities(model: Path, ct: Path, task: str) -> np.ndarray:
    """The single-task pass's class probabilities on ``ct``'s grid (C, X, Y, Z): softmax, then MONAI's ``Invertd``."""
    settings = {"tta": False, "overlap": 0.5, "device": "$torch.device('cpu')", **TINY}
    predictor = Predictor(str(BUNDLE), str(model), task, settings, False)
    item = predictor.preprocess({"image": predictor.load({"image": str(ct)})["image"], "task": task})
    with torch.no_grad():
        logits = predictor.inferer(item["image"][None], predictor.network)[0]
    invert = Invertd("pred", predictor.preprocess, orig_keys="image", nearest_interp=False)
    return invert(Activationsd("pred", softmax=True)({"image": item["image"], "pred": logits}))["pred"].numpy()


def test_maps_equal_those_of_float64_resampling_and_softmax_invertd_argmax(model, organs, phantoms):
    """The bounded-memory steps (float32 resampling to the task spacing, ``InvertArgmaxd``) against how the maps were
    made before them (float64, ``Activationsd`` -> ``Invertd`` -> ``AsDiscreted``), for a CT stored RAS and one
    stored LPS: Dice >= 0.999 per class."""
    steps = json.loads((BUNDLE / "configs" / "inference.json").read_text())["preprocessing"]["transforms"]
    resample = next(i for i, t in enumerate(steps) if t["_target_"].endswith("ResampleToTaskSpacingd"))
    settings = {"tta": False, "overlap": 0.5, "device": "$torch.device('cpu')", **TINY}
    before = Predictor(str(BUNDLE), str(model), "ph_organs", settings | {
        f"preprocessing#transforms#{resample}#dtype": "$torch.float64"}, False)  # fmt: skip
    before.postprocess = Compose([
        Activationsd("pred", softmax=True),
        Invertd("pred", before.preprocess, orig_keys="image", nearest_interp=False),
        AsDiscreted("pred", argmax=True),
    ])  # fmt: skip
    for case in (8, 9):
        ct = image(phantoms, "abdomen", case)
        old = np.asarray(
            before.segment(before.load({"image": str(ct)}), before.tasks("ph_organs", None))[0]["ph_organs"]
        )
        new = np.asarray(nib.load(organs[1] / f"abdomen_00{case}_ct_ph_organs.nii.gz").dataobj)
        assert old.shape == new.shape and len(np.unique(old)) > 1
        for k in np.unique(old):
            assert 2 * ((old == k) & (new == k)).sum() / ((old == k).sum() + (new == k).sum()) >= 0.999


def test_a_corrupt_input_is_reported_and_the_others_written(model, small, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(small["ras"], folder)
    (folder / "bad.nii.gz").write_bytes(np.random.default_rng(0).bytes(3000))
    assert run(model, f"{folder},{small['lps']}", tmp_path / "out", "ph_organs") == 1  # comma-separated inputs
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == [f"small_{s}_ph_organs.{e}" for s in ("lps", "ras") for e in ("json", "nii.gz")]
    captured = capsys.readouterr()
    assert str(folder / "bad.nii.gz") in captured.err
    assert captured.out.strip().endswith(f"2 case(s) written to {tmp_path / 'out'}, 1 failed: bad")


def test_a_truncated_input_fails_alone_but_a_bug_stops_the_run(model, small, tmp_path, capsys, monkeypatch):
    """A file whose header reads but whose voxels are cut off is one failed case; a bug in the code (here a KeyError
    while segmenting) keeps its traceback instead of reading as a bad case."""
    raw = small["lps"].read_bytes()
    small["lps"].write_bytes(raw[: len(raw) // 2])  # the header intact, the voxels cut off
    assert run(model, f"{small['ras']},{small['lps']}", tmp_path / "out", "ph_organs") == 1
    captured = capsys.readouterr()
    assert f"small_lps ({small['lps']}) failed: " in captured.err
    assert captured.out.strip().endswith(f"1 case(s) written to {tmp_path / 'out'}, 1 failed: small_lps")

    def bug(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(Predictor, "segment", bug)
    with pytest.raises(KeyError, match="a bug"):
        run(model, str(small["ras"]), tmp_path / "again", "ph_organs")


def test_never_overwrites_an_input_nor_leaves_partial_files(model, small, tmp_path, monkeypatch):
    ct = small["ras"]
    clash = Path(shutil.copy(ct, tmp_path / "small_ras_ph_organs.nii.gz"))  # the name of case small_ras's output
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match="holds the input"):
        run(model, str(ct), tmp_path, "ph_organs")
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before and clash.exists()

    def interrupted(self) -> bytes:
        raise OSError("disk full")

    monkeypatch.setattr(nib.Nifti1Image, "to_bytes", interrupted)  # the output's write fails halfway
    assert run(model, str(ct), tmp_path / "out", "ph_organs") == 1
    assert not (tmp_path / "out").exists()  # no temporary file, no half-written output, no empty folder


def write_dicom_series(nifti: Path, folder: Path) -> None:
    """One DICOM file per slice (itk + GDCM), positions and orientation from the NIfTI's geometry."""
    volume = itk.imread(str(nifti))
    voxels = itk.array_from_image(volume)  # (Z, Y, X)
    origin, spacing = np.array(volume.GetOrigin()), np.array(volume.GetSpacing())
    direction = np.array(volume.GetDirection())  # LPS, columns = axes
    folder.mkdir()
    for k in range(voxels.shape[0]):
        plane = itk.image_from_array(np.ascontiguousarray(voxels[k]))
        plane.SetSpacing(spacing[:2].tolist())
        tags = plane.GetMetaDataDictionary()
        tags["0020|0032"] = "\\".join(f"{v:.6f}" for v in origin + direction[:, 2] * spacing[2] * k)
        tags["0020|0037"] = "\\".join(f"{v:.6f}" for v in np.concatenate([direction[:, 0], direction[:, 1]]))
        tags["0018|0050"], tags["0020|0013"], tags["0008|0060"] = f"{spacing[2]:.6f}", str(k + 1), "CT"
        tags["0020|000d"], tags["0020|000e"] = "1.2.826.0.1.3680043.2.1125.1", "1.2.826.0.1.3680043.2.1125.2"
        io = itk.GDCMImageIO.New()
        io.KeepOriginalUIDOn()
        locales = locale.setlocale(locale.LC_ALL)
        try:
            itk.imwrite(plane, str(folder / f"slice{k:03d}.dcm"), imageio=io)
        finally:  # GDCM's writer leaves LC_CTYPE "C": this process would read its children's UTF-8 output as ASCII
            locale.setlocale(locale.LC_ALL, locales)


def test_nrrd_and_dicom_inputs_keep_the_geometry(model, small, tmp_path):
    nrrd, dicom = tmp_path / "lps.nrrd", tmp_path / "ras_dicom"
    itk.imwrite(itk.imread(str(small["lps"])), str(nrrd))
    write_dicom_series(small["ras"], dicom)
    assert run(model, [str(nrrd), str(dicom)], tmp_path / "out", "ph_organs") == 0
    check_output(tmp_path / "out", "lps", "ph_organs", small["lps"], ORGANS, [str(nrrd)], model)
    check_output(tmp_path / "out", "ras_dicom", "ph_organs", small["ras"], ORGANS, [str(dicom)], model)


def test_a_dicom_series_missing_a_slice_or_not_dicom_is_refused_unread(model, small, tmp_path, capsys, monkeypatch):
    """ITK's series reader skips a file GDCM cannot read and reads a series missing a slice on a uniform grid:
    refused before loading, naming the file / the gap, as is a sub-folder holding no DICOM (no ITK warnings)."""
    whole, cut, gap, other = (tmp_path / name for name in ("whole", "cut", "gap", "nested/other"))
    write_dicom_series(small["ras"], whole)
    shutil.copytree(whole, cut)
    (cut / "slice009.dcm").write_bytes((whole / "slice009.dcm").read_bytes()[:2000])
    shutil.copytree(whole, gap)
    (gap / "slice004.dcm").unlink()
    other.mkdir(parents=True)
    shutil.copy(small["ras"], other / "x.nii.gz")  # -i nested: the sub-folder other is taken for a DICOM series

    def never(self, data):
        raise AssertionError(f"{data['image']} was loaded")

    monkeypatch.setattr(predict_module.ThreadSafeLoadImaged, "__call__", never)
    assert run(model, [str(cut), str(gap), str(other.parent)], tmp_path / "out", "ph_organs") == 1
    err = capsys.readouterr().err
    assert f"{cut / 'slice009.dcm'}: a truncated or corrupt file (GDCM reads its transfer syntax, " in err
    assert f"{gap / 'slice003.dcm'}: the slice positions are not evenly spaced (gaps " in err
    assert f"{other}: not a DICOM series (no DICOM image in it: x.nii.gz)" in err
    assert "No Series were found" not in err and not (tmp_path / "out").exists()


def test_real_ct_volumes_nifti_ras_lps_nrrd_and_dicom_keep_their_geometry(model, tmp_path):
    """Real CT from ../shared (TotalSegmentator examples): NIfTI stored RAS and LPS, the LPS one as NRRD, and a
    DICOM series (geometry reference: the series as ITK reads it, written to NIfTI; TotalSegmentator's NIfTI of
    that series holds the same voxel centres with the y axis stored reversed)."""
    real = "data/real_samples/totalseg_examples"
    ras, lps = shared_path(f"{real}/ct_abdomen_3mm_crop.nii.gz"), shared_path(f"{real}/ct_thorax_1p5mm.nii.gz")
    dicom, dicom_geometry = shared_path(f"{real}/ct_dicom"), tmp_path / "dicom_as_itk_reads_it.nii.gz"
    itk.imwrite(itk.imread(str(dicom)), str(dicom_geometry))
    corners = np.array(list(np.ndindex(2, 2, 2))) * (np.array(nib.load(dicom_geometry).shape) - 1)
    world = [
        np.array(sorted(nib.affines.apply_affine(nib.load(p).affine, corners).tolist()))
        for p in (dicom_geometry, shared_path(f"{real}/ct_dicom_seg_total.nii.gz"))
    ]
    np.testing.assert_allclose(world[0], world[1], atol=0.01)  # the same voxel grid in the world
    assert nib.aff2axcodes(nib.load(ras).affine) == ("R", "A", "S")
    assert nib.aff2axcodes(nib.load(lps).affine) == ("L", "P", "S")
    nrrd = tmp_path / "thorax.nrrd"
    itk.imwrite(itk.imread(str(lps)), str(nrrd))
    inputs = [ras, lps, nrrd, dicom]
    assert run(model, [str(i) for i in inputs], tmp_path / "out", "ph_organs") == 0
    for (case, source), given in zip(
        (("ct_abdomen_3mm_crop", ras), ("ct_thorax_1p5mm", lps), ("thorax", lps), ("ct_dicom", dicom_geometry)), inputs
    ):
        check_output(tmp_path / "out", case, "ph_organs", source, ORGANS, [str(given)], model)


def test_command_line_with_short_flags_and_exit_code(model, phantoms, tmp_path):
    from uniseg_monai.cli import main

    good, bad = image(phantoms, "abdomen", 8), tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    argv = ["predict", "-i", f"{good},{bad}", "-o", str(tmp_path / "out"), "--task", "ph_organs"]
    argv += ["--bundle", str(BUNDLE), "--checkpoint", str(model), "--device", "cpu", "--base_features", "4"]
    argv += ["--patch_size", "[64,64,32]"]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 1  # one input failed
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "abdomen_008_ct_ph_organs.json",
        "abdomen_008_ct_ph_organs.nii.gz",
    ]
