"""``uniseg predict --output_type dicom_seg``: DICOM SEG (BINARY and LABELMAP) of the real 512x512x20 CT series of
../shared, read back with highdicom and with pydicom alone and compared with the NIfTI maps of the same run on the
series grid; geometry variants made by rewriting copies of the series' headers; RLE / JPEG-LS re-encodings and
non-image instances beside the series (same maps); a gantry tilt, transfer syntaxes GDCM cannot read and missing
pixel data (refused unread); dciodvfy; the task registry's codes.

The model is a randomly initialised tiny UniSeg whose two tasks (``liver``: registry codes; ``organ_x``: a user task
without codes) run at 8 x 8 x 4 mm, so the series is one sliding window."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from conftest import shared_path
from pydicom.uid import JPEGLSLossless, RLELossless, generate_uid

from uniseg_monai.apps import predict as predict_module
from uniseg_monai.apps.predict import predict
from uniseg_monai.core.errors import UsageError, raised_in
from uniseg_monai.model_io.model_files import save_model
from uniseg_monai.networks import UniSeg, nnunet_features
from uniseg_monai.tasks import CLASS_CODES, DEFAULT_CLASS_CODE, SCT_CODES, TaskRegistry, task_table

SAMPLE = "data/real_samples/totalseg_examples/ct_dicom"
COARSE = {"modalities": ["CT"], "spacing": [8.0, 8.0, 4.0], "normalization": ["ct"]}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    tasks = task_table(
        {
            "liver": {"id": 0, "labels": ["background", "liver", "liver tumour"], **COARSE},
            "organ_x": {"id": 1, "labels": ["background", "part a", "part b"], **COARSE},
        },
        "test",
    )
    torch.manual_seed(0)
    network = UniSeg(num_tasks=2, num_classes=3, patch_size=(64, 64, 32), features=list(nnunet_features(4)))
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model(path, network.state_dict(), network.network_def(), tasks)
    return path


def make_series(
    dst: Path,
    reverse=False,
    negative_columns=False,
    drop=None,
    no_thickness=False,
    scout=False,
    tilt=0.0,
    syntax=None,
    label_syntax=None,
    no_pixels=None,
    blank=(),
    patient_sex=None,
) -> Path:
    """A copy of the sample series (JPEG 2000 lossless) with its (anonymised away) study / series / instance UIDs
    filled in, rewritten: files named in reversed order, a negative column direction, a slice left out, no
    SliceThickness, a localizer (its own series) added, each slice shifted along y by ``tilt`` times its distance
    from the first (a gantry tilt: positions off the slice normal), the pixels re-encoded in transfer ``syntax``
    (pydicom's encoders), the transfer syntax UID relabelled ``label_syntax`` (one no installed decoder reads),
    the pixel data of slice ``no_pixels`` removed, the attributes ``blank`` (e.g. UIDs) present but empty, PatientSex
    ``patient_sex``."""
    dst.mkdir(parents=True)
    files = sorted(shared_path(SAMPLE).iterdir())
    study, series = generate_uid(entropy_srcs=["t28 study"]), generate_uid(entropy_srcs=["t28 series"])
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    for i, path in enumerate(files):
        if i == drop:
            continue
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = study, series, 3
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        for key in blank:
            setattr(ds, key, "")
        if patient_sex is not None:
            ds.PatientSex = patient_sex
        if negative_columns:
            ds.ImageOrientationPatient = [1, 0, 0, 0, -1, 0]
        if no_thickness:
            del ds.SliceThickness
        if tilt:
            ds.ImagePositionPatient[1] += tilt * (ds.ImagePositionPatient[2] - first.ImagePositionPatient[2])
        if syntax:
            ds.decompress()
            ds.compress(syntax)
        if i == no_pixels:
            del ds.PixelData
        if label_syntax:
            ds.file_meta.TransferSyntaxUID = label_syntax  # pydicom 3.0 knows no name for it: encoding forced
            ds.save_as(dst / path.name, implicit_vr=False, little_endian=True, force_encoding=True)
            continue
        ds.save_as(dst / (f"{len(files) - i:03d}.dcm" if reverse else path.name))
        if scout and i == 0:
            ds.SeriesInstanceUID, ds.SeriesDescription = generate_uid(entropy_srcs=["t28 scout"]), "Topogram"
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["t28 scout sop"])
            ds.ImageType, ds.ImageOrientationPatient = ["ORIGINAL", "PRIMARY", "LOCALIZER"], [1, 0, 0, 0, 0, -1]
            ds.save_as(dst / "scout.dcm")
    return dst


def run(model: Path, source: Path | list[str], out: Path, task: str = "all", **kwargs) -> int:
    source = source if isinstance(source, list) else str(source)
    return predict(source, str(out), task, checkpoint=str(model), device="cpu", patch_size=[64, 64, 32],
                   overlap=0, **kwargs)  # fmt: skip


def expected_frames(nifti: Path, instances: list) -> dict[str, np.ndarray]:
    """A NIfTI map sampled at every source instance's pixel centres (world LPS -> RAS -> voxel): SOP UID -> frame."""
    image = nib.load(nifti)
    data, inverse = np.asarray(image.dataobj), np.linalg.inv(image.affine)
    frames = {}
    for ds in instances:
        rows, cols = np.mgrid[0 : ds.Rows, 0 : ds.Columns]
        iop = np.asarray(ds.ImageOrientationPatient, float)
        lps = (np.asarray(ds.ImagePositionPatient, float) + cols[..., None] * float(ds.PixelSpacing[1]) * iop[:3]
               + rows[..., None] * float(ds.PixelSpacing[0]) * iop[3:])  # fmt: skip
        ijk = np.rint((lps * [-1, -1, 1]) @ inverse[:3, :3].T + inverse[:3, 3]).astype(int)
        frames[str(ds.SOPInstanceUID)] = data[ijk[..., 0], ijk[..., 1], ijk[..., 2]]
    return frames


def check_round_trip(out: Path, case: str, series: Path, seg_type: str) -> dict:
    """The SEG against the NIfTI maps of the same run: read with pydicom alone and with highdicom, every source
    instance's frame per segment equals the map sampled there; each segment's frames in slice order (monotonic);
    segment numbers 1..N as the sidecar says, its empty classes without voxels. Returns the sidecar."""
    import highdicom as hd

    sidecar = json.loads((out / f"{case}_all.seg.json").read_text())
    instances = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(series.iterdir())]
    instances = [ds for ds in instances if ds.SeriesInstanceUID == sidecar["series_uid"]]
    merged = json.loads((out / f"{case}_all_merged.json").read_text())["labels"]
    maps = {t: expected_frames(out / f"{case}_{t}.nii.gz", instances) for t in ("liver", "organ_x")}
    maps["all_merged"] = expected_frames(out / f"{case}_all_merged.nii.gz", instances)
    numbers = {(e["task"], e["class"]): int(n) for n, e in sidecar["segments"].items()}
    assert sorted(numbers.values()) == list(range(1, len(numbers) + 1))

    def expected(uid: str, n: int) -> np.ndarray:  # segment n's mask on an instance
        task, k = next(key for key, m in numbers.items() if m == n)
        if seg_type == "binary":
            return maps[task][uid] == k
        merged_value = next(int(v) for v, e in merged.items() if (e["task"], e["class"]) == (task, k))
        return maps["all_merged"][uid] == merged_value

    seg = pydicom.dcmread(out / sidecar["seg"])
    assert seg.StudyInstanceUID == instances[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == instances[0].FrameOfReferenceUID
    assert {str(s.SegmentLabel) for s in seg.SegmentSequence if s.SegmentNumber} == {
        e["label"] for e in sidecar["segments"].values()
    }
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    position = {str(ds.SOPInstanceUID): float(ds.ImagePositionPatient[2]) for ds in instances}
    normal = np.cross(*np.reshape(np.asarray(instances[0].ImageOrientationPatient, float), (2, 3)))[2]
    seen, order = set(), {}
    for f, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = str(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        if seg_type == "binary":
            n = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            np.testing.assert_array_equal(pixels[f] == 1, expected(uid, n), err_msg=f"frame {f}, segment {n}")
            seen.add((uid, n))
            order.setdefault(n, []).append(position[uid] * normal)
        else:
            for n in numbers.values():
                np.testing.assert_array_equal(pixels[f] == n, expected(uid, n), err_msg=f"frame {f}, segment {n}")
                seen.add((uid, n))
            order.setdefault(0, []).append(position[uid] * normal)
    for uid in position:  # omitted frames are empty
        for n in numbers.values():
            if (uid, n) not in seen:
                assert not expected(uid, n).any(), (uid, n)
    steps = [np.sign(np.diff(p)) for p in order.values()]  # one slice after the other, as highdicom orders them
    assert all(len(set(s)) == 1 and s[0] != 0 for s in steps)
    for e in sidecar["empty"]:
        mask = maps["all_merged" if seg_type == "labelmap" else e["task"]]
        value = (
            e["class"]
            if seg_type == "binary"
            else next(int(v) for v, m in merged.items() if (m["task"], m["class"]) == (e["task"], e["class"]))
        )
        assert not any((f == value).any() for f in mask.values())

    read = hd.seg.segread(out / sidecar["seg"])  # highdicom: the same pixels per source instance
    uids = list(position)
    numbers_sorted = sorted(numbers.values())
    if seg_type == "binary":
        stack = read.get_pixels_by_source_instance(uids, segment_numbers=numbers_sorted)
        for u, uid in enumerate(uids):
            for s, n in enumerate(numbers_sorted):
                np.testing.assert_array_equal(stack[u, :, :, s] > 0, expected(uid, n))
    else:
        stack = read.get_pixels_by_source_instance(uids, combine_segments=True)
        for u, uid in enumerate(uids):
            for n in numbers_sorted:
                np.testing.assert_array_equal(stack[u] == n, expected(uid, n))
    return sidecar


@pytest.fixture(scope="module")
def written(model, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """The sample series segmented by ``--task all`` into NIfTI + BINARY and NIfTI + LABELMAP SEGs."""
    series = make_series(tmp_path_factory.mktemp("series") / "ct")
    done = {}
    for seg_type in ("binary", "labelmap"):
        out = tmp_path_factory.mktemp(seg_type)
        assert run(model, series, out, output_type="nifti,dicom_seg", seg_type=seg_type) == 0
        done[seg_type] = series, out
    return done


@pytest.mark.parametrize("seg_type", ["binary", "labelmap"])
def test_round_trip_equals_the_nifti_maps_on_the_series_grid(written, seg_type):
    series, out = written[seg_type]
    sidecar = check_round_trip(out, "ct", series, seg_type)
    labels = {e["label"] for e in [*sidecar["segments"].values(), *sidecar["empty"]]}
    assert labels == {"liver: liver", "liver: liver tumour", "organ_x: part a", "organ_x: part b"}
    assert sidecar["default_coded"] == ["organ_x: part a", "organ_x: part b"]
    seg = pydicom.dcmread(out / sidecar["seg"])
    coded = {str(s.SegmentLabel): s for s in seg.SegmentSequence}
    if "liver: liver" in coded:
        assert coded["liver: liver"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert seg.SegmentationType == seg_type.upper()


@pytest.mark.parametrize("variant", [{"reverse": True}, {"negative_columns": True}], ids=lambda v: next(iter(v)))
def test_geometry_variants_segment_correctly(model, tmp_path, variant):
    series = make_series(tmp_path / "ct", **variant)
    assert run(model, series, tmp_path / "out", output_type="nifti,dicom_seg") == 0
    check_round_trip(tmp_path / "out", "ct", series, "binary")


def non_image(path: Path, modality: str, sop_class: str, study: str) -> None:
    """A minimal non-image instance (an SR, a presentation state) of the study, in its own series."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, generate_uid(), modality
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless], ids=["rle", "jpeg-ls"])
def test_a_compressed_series_segments_to_the_same_maps(model, written, tmp_path, syntax):
    """RLE Lossless and JPEG-LS Lossless re-encodings of the (JPEG 2000) sample series, read by ITK's GDCM: the same
    NIfTI maps and SEG frames as the original series."""
    series = make_series(tmp_path / "ct", syntax=syntax)
    assert pydicom.dcmread(next(series.iterdir())).file_meta.TransferSyntaxUID == syntax
    assert run(model, series, tmp_path / "out", output_type="nifti,dicom_seg") == 0
    _, original = written["binary"]
    for task in ("liver", "organ_x"):
        expected = np.asarray(nib.load(original / f"ct_{task}.nii.gz").dataobj)
        np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "out" / f"ct_{task}.nii.gz").dataobj), expected)
    check_round_trip(tmp_path / "out", "ct", series, "binary")


def test_non_image_instances_beside_the_series_are_ignored(model, written, tmp_path):
    """An SR, a presentation state and the SEG of an earlier run in the series folder belong to no image series:
    the series is read without them and segments as before."""
    series = make_series(tmp_path / "ct")
    study = str(pydicom.dcmread(next(series.iterdir()), stop_before_pixels=True).StudyInstanceUID)
    non_image(series / "report.dcm", "SR", "1.2.840.10008.5.1.4.1.1.88.22", study)
    non_image(series / "state.dcm", "PR", "1.2.840.10008.5.1.4.1.1.11.1", study)
    _, original = written["binary"]
    shutil.copy(original / "ct_all.seg.dcm", series / "earlier.seg.dcm")
    assert run(model, series, tmp_path / "out", output_type="nifti,dicom_seg") == 0
    sidecar = check_round_trip(tmp_path / "out", "ct", series, "binary")
    assert sidecar["source_instances"] == 20


def test_tilt_unreadable_syntax_and_missing_pixels_are_refused_before_loading(model, tmp_path, capsys, monkeypatch):
    """From the headers (and one decoded slice per transfer syntax), before the series is loaded, one line each
    naming the file: a gantry tilt (positions sheared off the slice normal), a transfer syntax GDCM does not know
    (JPEG XL Lossless, 2024) or cannot decode (Deflated Image Frame Compression, 2024; relabelled copies), an image
    instance without pixel data."""
    folders = {
        "tilt": make_series(tmp_path / "tilt", tilt=0.1),
        "jpegxl": make_series(tmp_path / "jpegxl", label_syntax="1.2.840.10008.1.2.4.110"),
        "deflate": make_series(tmp_path / "deflate", label_syntax="1.2.840.10008.1.2.8.1"),
        "nopixels": make_series(tmp_path / "nopixels", no_pixels=4),
    }

    def never(self, data):
        raise AssertionError(f"{data['image']} was loaded")

    monkeypatch.setattr(predict_module.ThreadSafeLoadImaged, "__call__", never)
    assert run(model, [str(f) for f in folders.values()], tmp_path / "out", output_type="nifti,dicom_seg") == 1
    err = {line.split(" ")[2]: line for line in capsys.readouterr().err.splitlines() if "failed" in line}
    assert len(err) == 4 and not (tmp_path / "out").exists()
    names = sorted(p.name for p in shared_path(SAMPLE).iterdir())
    degrees = f"(a gantry tilt of {np.degrees(np.arctan(0.1)):.2g} degrees)"  # the shear, 0.1 mm per mm
    assert f"{folders['tilt']}/CT." in err["tilt"] and degrees in err["tilt"]
    assert "mm off the slice normal through the first slice" in err["tilt"]
    assert "export the series without tilt" in err["tilt"]
    fix = "export the series uncompressed or as JPEG / JPEG-LS / JPEG 2000 / RLE, which GDCM reads"
    for name, syntax in (("jpegxl", "1.2.840.10008.1.2.4.110"), ("deflate", "1.2.840.10008.1.2.8.1")):
        assert f": transfer syntax {syntax}, which " in err[name] and fix in err[name]
        assert f"{folders[name]}/CT." in err[name]
    assert f"{folders['nopixels']}/{names[4]}: an image instance without pixel data" in err["nopixels"]
    assert "Traceback" not in "".join(err.values())


def test_a_missing_slice_thickness_or_slice_and_a_localizer_are_refused_in_one_line_and_series_chooses(
    model, tmp_path, capsys
):
    """Refused before the series is loaded: no SliceThickness (the SEG copies it, nothing is invented), a missing
    slice (a gap), a localizer beside the series (listing both series; ``--series`` then picks the axial one)."""
    thin, gap = make_series(tmp_path / "thin", no_thickness=True), make_series(tmp_path / "gap", drop=7)
    assert run(model, [str(thin), str(gap)], tmp_path / "out", output_type="dicom_seg") == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "failed" in line]
    assert len(err) == 2 and "no SliceThickness, which a DICOM SEG copies from its source images" in err[0]
    assert "the slice positions are not evenly spaced" in err[1]
    scout = make_series(tmp_path / "ct", scout=True)
    assert run(model, scout, tmp_path / "out", output_type="dicom_seg") == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "failed" in line]
    axial = str(pydicom.dcmread(next(p for p in scout.iterdir() if p.name != "scout.dcm")).SeriesInstanceUID)
    assert len(err) == 1 and "holds 2 series: " in err[0] and "choose one with --series UID" in err[0]
    assert f"{axial} (CT Body 3.0, 20 files)" in err[0] and "(Topogram, localizer, 1 files)" in err[0]
    assert not (tmp_path / "out").exists()
    assert run(model, scout, tmp_path / "out", output_type="nifti,dicom_seg", series=axial) == 0
    sidecar = check_round_trip(tmp_path / "out", "ct", scout, "binary")
    assert sidecar["source_instances"] == 20 and sidecar["series_uid"] == axial


def test_outputs_are_not_replaced_without_overwrite_and_writes_are_atomic(model, written, tmp_path, monkeypatch):
    series, _ = written["binary"]
    out = tmp_path / "out"
    assert run(model, series, out, output_type="dicom_seg") == 0
    assert sorted(p.name for p in out.iterdir()) == ["ct_all.seg.dcm", "ct_all.seg.json"]
    with pytest.raises(FileExistsError, match=r"ct_all\.seg"):
        run(model, series, out, output_type="dicom_seg")
    assert run(model, series, out, output_type="dicom_seg", skip_existing=True) == 0
    before = (out / "ct_all.seg.dcm").read_bytes()
    original = predict_module.write_group

    def interrupted(files):
        def broken(f):
            f.write(b"DICM")
            raise KeyboardInterrupt

        original({p: (broken if p.name.endswith(".dcm") else w) for p, w in files.items()})

    monkeypatch.setattr(predict_module, "write_group", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(model, series, out, output_type="dicom_seg", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["ct_all.seg.dcm", "ct_all.seg.json"]
    assert (out / "ct_all.seg.dcm").read_bytes() == before


def test_a_file_input_or_a_bad_option_is_refused_in_one_line(model, tmp_path):
    image = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), image)
    with pytest.raises(UsageError, match=r"--output_type dicom_seg needs DICOM series folders as input; .*x.nii.gz"):
        run(model, image, tmp_path / "out", output_type="dicom_seg")
    with pytest.raises(UsageError, match="--output_type must be one or more of nifti, dicom_seg"):
        run(model, image, tmp_path / "out", output_type="rtstruct")
    with pytest.raises(UsageError, match="--seg_type must be one of binary, labelmap"):
        run(model, image, tmp_path / "out", output_type="dicom_seg", seg_type="fractional")
    assert not (tmp_path / "out").exists()


def dciodvfy_errors(seg: Path) -> list[str]:
    """The Error lines of the standard's validator (dicom3tools) for ``seg``."""
    if shutil.which("dciodvfy") is None:
        message = "dciodvfy missing (apt-get install dicom3tools; make test installs it as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run(["dciodvfy", "-new", str(seg)], capture_output=True, text=True)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def test_dciodvfy_reports_no_error(written):
    """Its 2022 Debian build predates the LABELMAP SEG (Sup. 243, 2024): it knows no such IOD and takes its
    background segment 0 for a numbering error; nothing else may be an error."""
    known_labelmap = ("Information Object Not found", "SegmentNumber not monotonically increasing from one")
    for seg_type, (_, out) in written.items():
        errors = dciodvfy_errors(out / "ct_all.seg.dcm")
        if seg_type == "labelmap":
            errors = [e for e in errors if not any(k in e for k in known_labelmap)]
        assert errors == [], seg_type


def test_empty_sop_class_and_instance_uids_are_taken_from_the_file_meta(model, tmp_path):
    """Present but empty in the dataset (as an anonymiser leaves them): the file meta's (the same UIDs by PS3.10)
    are referenced, and the SEG is valid."""
    series = make_series(tmp_path / "ct", blank=("SOPClassUID", "SOPInstanceUID"))
    assert run(model, series, tmp_path / "out", task="liver", output_type="dicom_seg") == 0
    seg = pydicom.dcmread(tmp_path / "out" / "ct_liver.seg.dcm")
    referenced = {(str(r.ReferencedSOPClassUID), str(r.ReferencedSOPInstanceUID))
                  for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}  # fmt: skip
    metas = [pydicom.filereader.read_file_meta_info(p) for p in series.iterdir()]
    assert referenced == {(str(m.MediaStorageSOPClassUID), str(m.MediaStorageSOPInstanceUID)) for m in metas}
    assert dciodvfy_errors(tmp_path / "out" / "ct_liver.seg.dcm") == []


def test_empty_study_series_or_frame_of_reference_uids_are_refused_before_loading(model, tmp_path, capsys, monkeypatch):
    """No source to take them from: one line per series naming a file and the attributes, before the series is
    loaded; the shared sample series itself (anonymised: empty study and series UIDs) too."""
    blanks = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
    folders = [make_series(tmp_path / key, blank=(key,)) for key in blanks] + [shared_path(SAMPLE)]

    def never(self, data):
        raise AssertionError(f"{data['image']} was loaded")

    monkeypatch.setattr(predict_module.ThreadSafeLoadImaged, "__call__", never)
    assert run(model, [str(f) for f in folders], tmp_path / "out", output_type="nifti,dicom_seg") == 1
    err = [line for line in capsys.readouterr().err.splitlines() if " failed: " in line]
    assert len(err) == 4 and not (tmp_path / "out").exists()
    missing = [*([key] for key in blanks), ["StudyInstanceUID", "SeriesInstanceUID"]]
    for line, folder, keys in zip(err, folders, missing):
        assert f"failed: InputError: {folder}/CT." in line and "(and 19 more file(s) of the series)" in line
        assert f": empty or missing {', '.join(keys)} (removed by an anonymiser?)" in line
        assert "re-export the series with its UIDs" in line and "Traceback" not in line


def test_a_case_whose_seg_cannot_be_built_fails_alone_and_keeps_its_nifti(model, tmp_path, capsys):
    """A header value highdicom refuses (PatientSex 'U', not M / F / O) fails that case in one line naming the file
    once it is segmented: its NIfTI maps are written, no SEG; the other case is written whole; exit 1."""
    good, bad = make_series(tmp_path / "good"), make_series(tmp_path / "bad", patient_sex="U")
    out = tmp_path / "out"
    assert run(model, [str(bad), str(good)], out, task="liver", output_type="nifti,dicom_seg") == 1
    err = [line for line in capsys.readouterr().err.splitlines() if " failed: " in line]
    assert len(err) == 1 and f"bad ({bad}) failed: InputError: {bad}/CT." in err[0]
    assert "its series' headers make no valid DICOM SEG (ValueError from highdicom: 'U' is not a valid" in err[0]
    assert "(its NIfTI maps were written, no DICOM SEG)" in err[0]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("bad")) == ["bad_liver.json", "bad_liver.nii.gz"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("good")) == [
        "good_liver.json", "good_liver.nii.gz", "good_liver.seg.dcm", "good_liver.seg.json"
    ]  # fmt: skip


def test_only_errors_raised_inside_highdicom_or_pydicom_count_as_header_errors():
    """A bug in this package's own code (an error raised in it) keeps its traceback."""
    with pytest.raises(TypeError) as library:
        pydicom.uid.UID(pydicom.dataelem.DataElement(0x00080016, "UI", "1.2"))
    with pytest.raises(TypeError) as own:
        int([])
    assert raised_in(library.value, ("highdicom", "pydicom")) and not raised_in(own.value, ("highdicom", "pydicom"))


def test_registry_codes_are_pydicom_sct_constants_and_cover_the_paper_tasks():
    from pydicom.sr.codedict import codes

    for name, (value, meaning) in SCT_CODES.items():
        code = getattr(codes.SCT, name)
        assert (code.value, code.meaning) == (value, meaning), name
    registry = TaskRegistry()
    for task, classes in CLASS_CODES.items():
        assert set(classes) <= set(registry[task].labels[1:]), task  # no code for a class that does not exist
        for code in classes.values():
            assert {code.category, code.type, code.region or "Tissue"} <= set(SCT_CODES)
    defaulted = {(t, c) for t in registry for c in registry[t].labels[1:] if c not in CLASS_CODES.get(t, {})}
    assert defaulted == {("btcv", "portal and splenic vein"), ("brats21", "non-enhancing/necrotic tumour")}
    assert DEFAULT_CLASS_CODE.category == DEFAULT_CLASS_CODE.type == "Tissue"
