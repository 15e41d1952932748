"""DICOM in, DICOM SEG out: which series of a folder is read (``--series``), and label maps written as DICOM
Segmentation instances (highdicom) whose frames are pixel-aligned with the source series' instances.

The label maps come from the series as ITK reads it (MONAI's ``ITKReader``: RAS affine, any file order); each source
instance's frame is found on that grid from its own ImagePositionPatient / ImageOrientationPatient / PixelSpacing,
so neither the order of the files on disk nor the direction of the rows and columns matters.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from uniseg_monai.core.errors import InputError, UsageError
from uniseg_monai.tasks import DEFAULT_CLASS_CODE, SCT_CODES, ClassCode, Task, class_code

SEG_TYPES = ("binary", "labelmap")
IMAGE_STORAGE_EXCLUDED = ("1.2.840.10008.5.1.4.1.1.66.4",)  # a SEG is no source image
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
SEG_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID")
FROM_FILE_META = {"SOPClassUID": "MediaStorageSOPClassUID", "SOPInstanceUID": "MediaStorageSOPInstanceUID"}


@dataclass(frozen=True)
class Series:
    """One DICOM series of a folder: its UID, description and files (image instances only)."""

    uid: str
    description: str
    files: tuple[Path, ...]
    localizer: bool
    orientations: dict[tuple[float, ...], list[Path]]  # ImageOrientationPatient (rounded) -> its files


def _headers(folder: Path) -> dict[Path, Any]:
    """The DICOM image headers (no pixel data) of the files in ``folder``; files pydicom cannot read as DICOM are
    left out (``check_dicom_series`` names them), and so are instances that are no source image (no Rows: an SR, a
    presentation state, a key object; or a SEG, e.g. written by an earlier run): they belong to no image series."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    found = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError):
            continue
        if "SeriesInstanceUID" in ds and "Rows" in ds and ds.get("SOPClassUID") not in IMAGE_STORAGE_EXCLUDED:
            found[path] = ds
    return found


def list_series(folder: str | os.PathLike) -> list[Series]:
    """The series of a DICOM folder, largest first."""
    groups: dict[str, list[tuple[Path, Any]]] = {}
    for path, ds in _headers(Path(folder)).items():
        groups.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
    series = []
    for uid, members in groups.items():
        ds = members[0][1]
        kinds = {str(v).upper() for _, d in members for v in (d.get("ImageType") or [])}
        orientations: dict[tuple[float, ...], list[Path]] = {}
        for p, d in members:
            key = tuple(np.round(np.asarray(d.get("ImageOrientationPatient") or [0] * 6, float), 3).tolist())
            orientations.setdefault(key, []).append(p)
        series.append(Series(uid, str(ds.get("SeriesDescription", "")), tuple(p for p, _ in members),
                             "LOCALIZER" in kinds or "SCOUT" in kinds, orientations))  # fmt: skip
    return sorted(series, key=lambda s: -len(s.files))


def describe(series: Sequence[Series]) -> str:
    """The series as one line: UID, description and file count each."""
    return "; ".join(
        f"{s.uid} ({s.description or 'no description'}{', localizer' if s.localizer else ''}, {len(s.files)} files)"
        for s in series
    )


def choose_series(folder: str | os.PathLike, uid: str | None) -> Series | None:
    """The series of ``folder`` to read: the one with ``uid`` (``--series``), else its only series; None when the
    folder holds no DICOM image (``check_dicom_series`` says so). An :class:`InputError` in one line listing the
    series (UID, description, file count) when there are several and none is chosen, or ``uid`` is none of them."""
    series = list_series(folder)
    if not series:
        return None
    if uid is not None:
        chosen = [s for s in series if s.uid == str(uid)]
        if not chosen:
            raise InputError(f"{folder}: no series {uid} (--series) here; its series: {describe(series)}")
        series = chosen
    elif len(series) > 1:
        raise InputError(
            f"{folder} holds {len(series)} series: {describe(series)}; choose one with --series UID (or move the "
            "others, e.g. a localizer, out of the folder)"
        )
    if len(series[0].orientations) > 1:
        fewest = min(series[0].orientations.values(), key=len)
        raise InputError(
            f"{folder}: series {series[0].uid} mixes {len(series[0].orientations)} image orientations ({len(fewest)} "
            f"file(s) such as {fewest[0].name}: a localizer?); remove them from the folder"
        )
    return series[0]


def source_instances(files: Sequence[Path]) -> list[Any]:
    """The headers of a series' instances (no pixel data), sorted along the slice normal (ascending position:
    the order a viewer stacks them), read before the series is loaded; an :class:`InputError` naming the file for an
    instance without the geometry attributes a SEG needs, and one for the series when instances lack the UIDs it
    references (:func:`_missing_uids`)."""
    import pydicom

    instances, missing_uids = [], {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if k not in ds]
        if missing:
            raise InputError(f"{path}: no {', '.join(missing)}: a DICOM SEG cannot be aligned with it; re-export")
        if not ds.get("SliceThickness"):  # the SEG's pixel measures copy it (type 1 there): nothing to invent
            raise InputError(
                f"{path}: no SliceThickness, which a DICOM SEG copies from its source images; export the series with "
                "it, or use --output_type nifti"
            )
        if missing := _missing_uids(ds):
            missing_uids[path] = missing
        instances.append(ds)
    if missing_uids:
        path, missing = next(iter(missing_uids.items()))
        others = f" (and {len(missing_uids) - 1} more file(s) of the series)" if len(missing_uids) > 1 else ""
        raise InputError(
            f"{path}{others}: empty or missing {', '.join(missing)} (removed by an anonymiser?): a DICOM SEG "
            "references the study, series, instances and frame of reference by their UIDs; re-export the series "
            "with its UIDs (or anonymise it with a tool that keeps or replaces UIDs instead of blanking them), or use "
            "--output_type nifti"
        )
    normal = np.cross(*np.reshape(np.asarray(instances[0].ImageOrientationPatient, float), (2, 3)))
    return sorted(instances, key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient, float), normal)))


def _missing_uids(ds: Any) -> list[str]:
    """The UIDs a SEG references that the instance ``ds`` lacks (absent or empty); an empty or absent SOP Class /
    Instance UID is taken from the file meta (the same UID by PS3.10 7.1) and named only if that has none either."""
    meta = getattr(ds, "file_meta", None) or {}
    for key, stored in FROM_FILE_META.items():
        if not str(ds.get(key) or "").strip() and str(meta.get(stored) or "").strip():
            setattr(ds, key, str(meta.get(stored)).strip())
    return [k for k in SEG_UIDS if not str(ds.get(k) or "").strip()]


def frames_on_series(labels: np.ndarray, affine: np.ndarray, instances: Sequence[Any]) -> np.ndarray:
    """A label map (X, Y, Z) on the grid of ``affine`` (RAS, as MONAI loads the series) -> one frame (rows, columns)
    per source instance, pixel-aligned with it (its frame (r, c) is the voxel at the instance's pixel (r, c)). An
    :class:`InputError` when an instance's pixels do not lie on the grid's voxels (e.g. a gantry tilt)."""
    frames = np.empty((len(instances), int(instances[0].Rows), int(instances[0].Columns)), labels.dtype)
    groups: dict[tuple[int, int], list[tuple[int, int, np.ndarray, np.ndarray]]] = {}
    for n, ds in enumerate(instances):  # which voxels each frame's rows and columns run along
        axes, plane, r, c = _frame_voxels(ds, affine, labels.shape, frames.shape[1:])
        groups.setdefault(axes, []).append((n, plane, r, c))
    for (row_axis, column_axis), members in groups.items():  # one gather per orientation
        other = 3 - row_axis - column_axis
        volume = labels.transpose(other, row_axis, column_axis)
        planes = np.array([m[1] for m in members])[:, None, None]
        rows, cols = np.stack([m[2] for m in members])[:, :, None], np.stack([m[3] for m in members])[:, None, :]
        frames[[m[0] for m in members]] = volume[planes, rows, cols]
    return frames


def _frame_voxels(
    ds: Any, affine: np.ndarray, shape: tuple[int, ...], size: tuple[int, ...]
) -> tuple[tuple[int, int], int, np.ndarray, np.ndarray]:
    """Where an instance's pixels lie on the grid: (row axis, column axis), the index along the third axis and the
    voxel index of each row and each column; an :class:`InputError` when they are no voxels of the grid."""
    inverse = np.linalg.inv(np.asarray(affine, float))
    orientation = np.reshape(np.asarray(ds.ImageOrientationPatient, float), (2, 3))
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    origin = inverse[:3, :3] @ (LPS_TO_RAS @ np.asarray(ds.ImagePositionPatient, float)) + inverse[:3, 3]
    step_r = inverse[:3, :3] @ (LPS_TO_RAS @ orientation[1]) * row_spacing  # one row down
    step_c = inverse[:3, :3] @ (LPS_TO_RAS @ orientation[0]) * column_spacing  # one column to the right
    index = np.round(origin).astype(int)
    axes = [int(np.argmax(np.abs(step))) for step in (step_r, step_c)]
    signs = [int(np.sign(step[a])) for step, a in zip((step_r, step_c), axes)]
    ends = [index[a] + s * (k - 1) for a, s, k in zip(axes, signs, size)]
    off = (
        np.abs(origin - index).max() > 0.05
        or axes[0] == axes[1]
        or not all(np.allclose(step, np.eye(3)[a] * s, atol=0.01) for step, a, s in zip((step_r, step_c), axes, signs))
        or not all(0 <= i < shape[a] for a, i in zip(axes, ends))
        or not all(0 <= i < n for i, n in zip(index, shape))
    )
    if off:
        raise InputError(
            f"{getattr(ds, 'filename', 'an instance')}: its pixels do not lie on the series' voxel grid (a gantry "
            "tilt or mixed orientations): no pixel-aligned DICOM SEG; re-export the series without tilt"
        )
    lines = [index[a] + s * np.arange(k) for a, s, k in zip(axes, signs, size)]
    return (axes[0], axes[1]), int(index[3 - sum(axes)]), lines[0], lines[1]


@dataclass(frozen=True)
class Segment:
    """One segment: the class ``k`` of ``task`` with its label and coded meaning (``default``: the documented
    default, the registry has none)."""

    task: Task
    k: int
    label: str
    code: ClassCode
    default: bool


def segments_of(tasks: Sequence[Task], many: bool) -> list[Segment]:
    """Every non-background class of ``tasks`` (in id order) as a segment, labelled ``<task>: <class>`` when
    ``many`` (``--task all``), else ``<class>``."""
    out = []
    for task in sorted(tasks, key=lambda t: t.id):
        for k in range(1, task.num_classes):
            code = class_code(task, k)
            label = f"{task.name}: {task.labels[k]}" if many else task.labels[k]
            out.append(Segment(task, k, label, code or DEFAULT_CLASS_CODE, code is None))
    return out


def _code(name: str):
    from pydicom.sr.coding import Code

    value, meaning = SCT_CODES[name]
    return Code(value, "SCT", meaning)


def _lab(rgb: tuple[int, int, int]):
    import highdicom as hd

    return hd.color.CIELabColor.from_rgb(*rgb)


def build_seg(
    maps: dict[str, np.ndarray],
    affine: np.ndarray,
    tasks: Sequence[Task],
    instances: Sequence[Any],
    seg_type: str,
    many: bool,
    software: str,
    description: str,
) -> tuple[Any, dict[str, Any]]:
    """The DICOM SEG of the label maps ``maps`` (task -> (X, Y, Z) on the series grid ``affine``) of ``tasks`` over
    the source ``instances`` (sorted, :func:`source_instances`), and its sidecar fields: ``segments`` (segment
    number -> task, class, name, label, codes; consecutive from 1, empty classes left out), ``empty`` (the classes
    without a voxel), ``default_coded`` (classes given :data:`~uniseg_monai.tasks.DEFAULT_CLASS_CODE`).

    ``binary``: one segment per class, overlapping across tasks (``--task all``); ``labelmap``: one value per
    pixel, so where tasks overlap the later task (in id order) wins, as in the merged NIfTI map."""
    import highdicom as hd

    segments = segments_of(tasks, many)
    order = sorted(tasks, key=lambda t: t.id)
    frames = {t.name: frames_on_series(maps[t.name], affine, instances) for t in order}
    if seg_type == "labelmap" or len(order) == 1:  # one value per pixel: where tasks overlap the later one wins
        merged = np.zeros(next(iter(frames.values())).shape, np.uint16)
        for s in segments:
            merged[frames[s.task.name] == s.k] = segments.index(s) + 1
        present = np.zeros(len(segments) + 1, bool)
        present[np.unique(merged)] = True
        kept = [s for i, s in enumerate(segments) if present[i + 1]]
        renumber = np.zeros(len(segments) + 1, np.uint16)
        renumber[[segments.index(s) + 1 for s in kept]] = np.arange(1, len(kept) + 1)
        merged = renumber[merged]
        pixels = merged.astype(np.uint8 if len(kept) < 256 else np.uint16)
    else:  # overlapping binary segments: one plane per segment
        kept = [s for s in segments if (frames[s.task.name] == s.k).any()]
        pixels = np.stack([frames[s.task.name] == s.k for s in kept], axis=-1)
    if not kept:  # a SEG needs one segment: the first class, with no voxel
        kept = segments[:1]
        pixels = np.zeros(frames[order[0].name].shape, np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(name="UniSeg", version=software, family=_code_family())
    descriptions = []
    for number, s in enumerate(kept, 1):
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=s.label[:64],
                segmented_property_category=_code(s.code.category),
                segmented_property_type=_code(s.code.type),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                anatomic_regions=[_code(s.code.region)] if s.code.region else None,
                display_color=_lab(s.code.color),
            )
        )
    seg_kind = (
        hd.seg.SegmentationTypeValues.LABELMAP if seg_type == "labelmap" else hd.seg.SegmentationTypeValues.BINARY
    )
    source_series = int(instances[0].get("SeriesNumber") or 0)
    seg = hd.seg.Segmentation(
        source_images=list(instances),
        pixel_array=pixels,
        segmentation_type=seg_kind,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=source_series + 1000 if source_series + 1000 < 2**31 else 1,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="uniseg-monai",
        manufacturer_model_name="UniSeg",
        software_versions=software,
        device_serial_number="n/a",
        content_description=description[:64],
        content_label="UNISEG",
    )
    empty = [s for s in segments if s not in kept or not pixels.any()]  # a SEG without voxels keeps segment 1
    sidecar = {
        "seg_type": seg_type,
        "series_uid": str(instances[0].SeriesInstanceUID),
        "seg_series_uid": str(seg.SeriesInstanceUID),
        "seg_sop_instance_uid": str(seg.SOPInstanceUID),
        "frames": int(seg.NumberOfFrames),
        "source_instances": len(instances),
        "segments": {str(n): _entry(s) for n, s in enumerate(kept, 1)},
        "empty": [_entry(s) for s in empty],
        "default_coded": [s.label for s in segments if s.default],
    }
    return seg, sidecar


def _entry(s: Segment) -> dict[str, Any]:
    return {"task": s.task.name, "class": s.k, "name": s.task.labels[s.k], "label": s.label,
            "category": SCT_CODES[s.code.category][1], "type": SCT_CODES[s.code.type][1]}  # fmt: skip


def _code_family():
    from pydicom.sr.codedict import codes

    return codes.cid7162.ArtificialIntelligence


def check_seg_type(seg_type: str) -> str:
    """``seg_type`` if it is one of :data:`SEG_TYPES`, else a :class:`UsageError`."""
    if str(seg_type).lower() not in SEG_TYPES:
        raise UsageError(f"--seg_type must be one of {', '.join(SEG_TYPES)}, got {seg_type!r}")
    return str(seg_type).lower()


def require_highdicom() -> str:
    """highdicom's version, or a :class:`UsageError` naming what to install."""
    try:
        import highdicom
    except ImportError:
        raise UsageError(
            "--output_type dicom_seg needs highdicom: pip install 'uniseg-monai[dicom]' (highdicom, pydicom >= 3)"
        ) from None
    return highdicom.__version__
