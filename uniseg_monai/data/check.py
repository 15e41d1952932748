"""Data checks before training (nnU-Net integrity-check style).

``uniseg check-data`` (:func:`check_datalist`) reads every voxel; a bundle run checks the items it uses from the
file headers only (:func:`check_run_items`, milliseconds per case) before any data is cached, so a bad file fails in
seconds, not hours into a run. Both apply the same per-item rules (:func:`item_problems`).
"""

from __future__ import annotations

import difflib
import functools
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data.utils import correct_nifti_header_if_necessary
from monai.transforms import LoadImage
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from uniseg_monai.core.errors import USER_ERRORS, InputError
from uniseg_monai.core.notices import NIFTI_SUFFIXES, quiet_itk
from uniseg_monai.core.progress import progress_bar
from uniseg_monai.data.datalist import SECTIONS, DatalistError, read_datalist
from uniseg_monai.data.geometry import affine_problem, geometry_problem
from uniseg_monai.data.memory import GIB, available_memory, loading_memory
from uniseg_monai.tasks import Task, TaskError, TaskRegistry, resolve_task

LABELLED = ("training", "validation")  # sections whose items need a label (training, Dice during training)
# what reading a bad image file raises (nibabel: not a NIfTI / bad header; gzip / zlib: corrupt or truncated data;
# ITK, through MONAI's readers: RuntimeError or ValueError); anything else while reading is a bug
READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error, RuntimeError, ValueError)


@dataclass(frozen=True)
class Problem:
    where: str  # the file (or datalist entry) at fault
    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}\n    fix: {self.fix}"


@dataclass(frozen=True)
class Volume:
    """What a check knows of one file: channels, spatial shape (X, Y, Z; other lengths are not 3D volumes),
    affine (RAS, mm), when read fully the voxels (C, X, Y, Z), and whether the header says complex-valued voxels
    (which loading would cast to their real part)."""

    path: str
    channels: int
    shape: tuple[int, ...]
    affine: np.ndarray
    data: torch.Tensor | None = None
    complex_valued: bool = False


@functools.cache
def _loader() -> LoadImage:
    return LoadImage(image_only=True, ensure_channel_first=True)  # built on first use: MONAI's readers log at creation


def read_volume(path: str) -> Volume:
    """Every voxel of ``path`` (as the bundles load it); a NIfTI affine as the header says (:func:`read_header`),
    and its size checked against the file and the memory before a voxel is read (:func:`check_claimed_size`)."""
    header = read_header(path) if path.endswith(NIFTI_SUFFIXES) else None
    if header is not None:
        check_claimed_size(path, header)
        if header.complex_valued:  # refused from the header (:func:`_not_a_volume`): loading would cast it
            return header
    quiet_itk(path)
    img = _loader()(path)
    affine = header.affine if header is not None else np.asarray(img.affine)
    complex_valued = header is not None and header.complex_valued  # ITK's files: the headers' checks see it
    return Volume(path, int(img.shape[0]), tuple(img.shape[1:]), affine, img, complex_valued)


DEFLATE_MAX_RATIO = 1032  # deflate never compresses better than 1032:1: a .gz holds at least 1/1032 of its data


def check_claimed_size(path: str, volume: Volume) -> None:
    """An :class:`~uniseg_monai.core.errors.InputError` if the NIfTI header of ``path`` (read as ``volume``) claims
    more voxel bytes than the file can hold (a truncated file or a wrong header), or more memory to load
    (:func:`~uniseg_monai.data.memory.loading_memory`) than the machine has: a 4 kB file claiming 4000^3 voxels is
    refused so, not loaded."""
    header = nib.load(path).header
    claimed = int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    size = os.path.getsize(path)
    room = size * DEFLATE_MAX_RATIO if path.endswith(".gz") else size - int(header["vox_offset"])
    shown = f"{volume.channels} x {volume.shape} voxels of {header.get_data_dtype()}"
    if claimed > room:
        raise InputError(
            f"its header claims {shown} ({claimed / GIB:.3g} GiB), more than its {size} bytes can hold: the file is "
            "truncated or its header is wrong"
        )
    need, available = loading_memory(volume.shape, volume.channels), available_memory()
    if available is not None and need > available:
        raise InputError(
            f"its header claims {shown}: loading needs about {need / GIB:.3g} GiB, more than the {available / GIB:.3g}"
            " GiB available"
        )


def nifti_affine(img: nib.Nifti1Image, path: str) -> np.ndarray:
    """The affine MONAI's reader gives the NIfTI image ``img`` read from ``path``, unless its header states a broken
    one (:func:`~uniseg_monai.data.geometry.affine_problem`): the sform or qform in use, or the voxel axes' pixdims,
    read before nibabel sets a zero pixdim to 1 mm and MONAI swaps a bad form for the other one; that one then, as
    stated, so that :func:`~uniseg_monai.data.geometry.geometry_problem` refuses it as README says."""
    with nib.openers.ImageOpener(path) as f:
        raw = type(img.header).from_fileobj(f, check=False)  # the pixdims before nibabel's fix
    stated = [raw.get_sform()] if raw["sform_code"] else []
    stated += [raw.get_qform()] if raw["qform_code"] else []
    stated.append(np.diag([*np.asarray(raw["pixdim"][1:4], dtype=float), 1.0]))
    broken = next((affine for affine in stated if affine_problem(affine)), None)
    if broken is not None:
        return np.asarray(broken, dtype=float)
    return np.asarray(correct_nifti_header_if_necessary(img).affine, dtype=float)  # as MONAI's NibabelReader does


def read_header(path: str) -> Volume:
    """Channels, shape and affine of ``path`` from its header (NIfTI via nibabel, :func:`nifti_affine`; other formats
    via ITK); no voxels."""
    if path.endswith(NIFTI_SUFFIXES):
        img = nib.load(path)
        shape = tuple(int(s) for s in img.shape)
        # a 4th axis holds channels (MONAI's reader puts it first); a 5D+ file is no 3D volume, whatever its sizes
        channels, spatial = (shape[3], shape[:3]) if len(shape) == 4 else (1, shape)
        complex_valued = img.get_data_dtype().kind == "c"
        return Volume(path, channels, spatial, nifti_affine(img, path), complex_valued=complex_valued)
    import itk

    quiet_itk(path)
    io = itk.ImageIOFactory.CreateImageIO(path, itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        raise OSError(f"no reader for {path}")
    io.SetFileName(path)
    io.ReadImageInformation()
    n = io.GetNumberOfDimensions()
    shape = tuple(int(io.GetDimensions(i)) for i in range(n))
    direction = np.array([io.GetDirection(i) for i in range(n)], dtype=float).T[:3, :3] if n >= 3 else np.eye(3)
    spacing = np.array([io.GetSpacing(i) for i in range(min(n, 3))], dtype=float)
    affine = np.eye(4)
    if n >= 3:  # ITK is LPS: flip x and y to RAS
        affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ direction * spacing
        affine[:3, 3] = np.diag([-1.0, -1.0, 1.0]) @ np.array([io.GetOrigin(i) for i in range(3)])
    complex_valued = io.GetPixelType() == itk.CommonEnums.IOPixel_COMPLEX
    return Volume(path, int(io.GetNumberOfComponents()), shape, affine, complex_valued=complex_valued)


def _read(path: str, read: Callable[[str], Volume], problems: list[Problem]) -> Volume | None:
    if not Path(path).exists():
        problems.append(Problem(path, "file not found", "correct the path (relative paths start at the datalist)"))
        return None
    try:
        return read(path)
    except USER_ERRORS + READ_ERRORS as err:  # the file cannot be used
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        problems.append(Problem(path, f"unreadable or corrupt ({first[:200]})", "re-export or replace the file"))
        return None


def _not_a_volume(img: Volume) -> Problem | None:
    """A file that is no 3D image of real values, from its header: another number of axes, or complex voxels
    (MONAI's readers would keep only their real part, with a numpy warning)."""
    if len(img.shape) != 3:
        return Problem(img.path, f"not a 3D volume (shape {img.shape})", "provide 3D images (one file per channel)")
    if img.complex_valued:
        return Problem(
            img.path, "complex-valued voxels: not a real-valued image", "save the magnitude (or the real part) of "
            "the image as a real-valued file"
        )  # fmt: skip
    return None


def _check_image(img: Volume, task: Task, problems: list[Problem]) -> bool:
    if not_a_volume := _not_a_volume(img):
        problems.append(not_a_volume)
        return False
    geometry = geometry_problem(img.affine, task)
    if geometry:
        problems.append(
            Problem(img.path, geometry, "correct the header's voxel size / orientation (mm), or resample the file")
        )
        return False
    if img.data is not None:
        arr = img.data.float()
        if not torch.isfinite(arr).all():
            problems.append(
                Problem(img.path, "contains NaN or Inf intensities", "re-export the image, or replace those voxels")
            )
        elif arr.numel() == 0 or arr.max() == arr.min():
            problems.append(
                Problem(img.path, "empty or constant image", "check the export; a constant image is unusable")
            )
    return True


def grid_difference(img: Volume, ref: Volume) -> str | None:
    """How the grid of ``img`` differs from that of ``ref``: the shapes, or the largest difference of the affines
    (mm); None when they are the same (affines within 1e-3)."""
    if img.shape != ref.shape:
        return f"shape {img.shape} vs {ref.shape}"
    if np.allclose(img.affine, ref.affine, atol=1e-3):
        return None
    diff = np.abs(np.asarray(img.affine, dtype=float) - np.asarray(ref.affine, dtype=float))
    row, col = np.unravel_index(int(np.argmax(diff)), diff.shape)
    where, unit = (f"origin {'xyz'[row]}", " mm") if col == 3 and row < 3 else (f"affine[{row}][{col}]", "")
    shown = f"{img.affine[row, col]:g} vs {ref.affine[row, col]:g}{unit}"
    return f"affines differ by up to {diff.max():g} ({where}: {shown})"


def _paths(value: Any) -> list[str] | None:
    """The file(s) of an item's ``image`` (a path or a list, one per channel) or ``label``; None if malformed."""
    paths = value if isinstance(value, list) else [value]
    return [str(p) for p in paths] if paths and all(isinstance(p, str) and p for p in paths) else None


def item_problems(
    item: Mapping[str, Any],
    task: Task,
    where: str,
    labelled: bool,
    read: Callable[[str], Volume] = read_volume,
    classes: set[int] | None = None,
) -> list[Problem]:
    """Every problem of one item (absolute paths) of ``task``; ``where`` names the entry, ``labelled``: it needs a
    label; ``read``: :func:`read_volume` (voxel checks too) or :func:`read_header` (header checks only); ``classes``:
    gets the task classes its label's voxels hold (after the ``label_map``)."""
    problems: list[Problem] = []
    paths = _paths(item.get("image"))
    if paths is None:
        fix = "give 'image' as a file path, or a list of paths in the task's modality order"
        return [Problem(where, f"'image' must be a file path or a list of paths, got {item.get('image')!r}", fix)]
    label_path = _paths(item["label"]) if "label" in item else None
    if "label" in item and (label_path is None or len(label_path) != 1):
        return [Problem(where, f"'label' must be one file path, got {item['label']!r}", "give one label file")]
    if label_path is None and labelled:
        fix = "add the case's 'label' file, or move the case to 'testing'"
        problems.append(Problem(where, f"no 'label' (image {paths[0]}); training and validation cases need one", fix))
    if label_path and label_path[0] in paths:
        fix = "point 'label' to the segmentation, not the image"
        return [*problems, Problem(where, f"the same file {label_path[0]} is the image and the label", fix)]
    images = [img for img in (_read(p, read, problems) for p in paths) if img is not None]
    if len(images) != len(paths) or not all(_check_image(img, task, problems) for img in images):
        return problems
    ref = images[0]
    problems += _channel_grid_problems(images)
    channels = sum(img.channels for img in images)
    if channels != task.in_channels:
        problems.append(
            Problem(
                ", ".join(paths),
                f"{channels} channel(s), task {task.name!r} expects {task.in_channels} ({'+'.join(task.modalities)})",
                "list one file per modality in the task's order, or use the right task",
            )
        )
    if label_path:
        label = _read(label_path[0], read, problems)
        if label is not None:
            _check_label(label, ref, task, problems, classes if classes is not None else set())
    return problems


def _channel_grid_problems(images: Sequence[Volume]) -> list[Problem]:
    """Channel files of one case (one per channel) that are not on the first one's grid."""
    fix = "resample the channel files onto one grid (the first channel's)"
    return [
        Problem(img.path, f"channel file is not on the grid of {images[0].path}: {difference}", fix)
        for img in images[1:]
        if (difference := grid_difference(img, images[0]))
    ]


def check_dicom_series(folder: str) -> None:
    """An :class:`~uniseg_monai.core.errors.InputError` in one line naming the DICOM series ``folder``, the file and
    the fix where ITK's series reader (as MONAI's ``ITKReader`` uses it) would fail or silently read a wrong grid,
    from the headers and one decoded slice per transfer syntax, before the series is loaded: no file GDCM can read
    (not a DICOM series); files it cannot read (the reader skips them: :func:`_unreadable`); a transfer syntax no
    installed decoder reads (:func:`_undecodable`); slice positions (ImagePositionPatient) off the slice normal (a
    gantry tilt: ITK reads a sheared stack as an orthogonal one) or not evenly spaced along it (a missing or doubled
    slice) (:func:`_position_problem`)."""
    import itk

    quiet_itk(folder)
    geometry, unreadable = {}, []
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")):
        io = itk.GDCMImageIO.New()
        io.SetFileName(str(path))
        try:
            io.ReadImageInformation()
        except RuntimeError:
            unreadable.append(path)
            continue
        direction = np.array([io.GetDirection(i) for i in range(3)], dtype=float).T  # columns: the axes
        spacing = np.array([io.GetSpacing(i) for i in range(2)], dtype=float)
        geometry[str(path)] = (np.array([io.GetOrigin(i) for i in range(3)]), direction, spacing)
    why = {path: _unreadable(path, list(geometry)) for path in unreadable[:1]}  # the first one explained
    if not geometry and not any(why.values()):
        shown = ", ".join(p.name for p in unreadable[:3]) + (f" and {len(unreadable) - 3} more" * (len(unreadable) > 3))
        raise InputError(f"{folder}: not a DICOM series (no DICOM image in it: {shown}); give image files or series")
    if unreadable:
        more = f" (and {len(unreadable) - 1} more unreadable file(s))" if len(unreadable) > 1 else ""
        reason = why[unreadable[0]] or "not a readable DICOM file"
        fix = "remove it from the folder or re-export the series"
        fix = DECODE_FIX if reason.startswith("transfer syntax") else fix
        raise InputError(f"{_shown(unreadable[0])}{more}: {reason}, so the series cannot be read whole; {fix}")
    names = itk.GDCMSeriesFileNames.New()  # the files of the series the reader takes, as MONAI's ITKReader does
    names.SetUseSeriesDetails(True)
    names.AddSeriesRestriction("0008|0021")
    names.SetDirectory(folder)
    files = [f for f in names.GetFileNames(names.GetSeriesUIDs()[0]) if f in geometry]
    problem = _undecodable(files) or _position_problem({f: geometry[f] for f in files})
    if problem:
        raise InputError(problem)


DECODE_FIX = (
    "export the series uncompressed or as JPEG / JPEG-LS / JPEG 2000 / RLE, which GDCM reads (a tool that decodes "
    "it converts it: `gdcmconv --raw IN OUT`, `dcmdjpeg IN OUT`), or convert it to NIfTI"
)


def _shown(path: str | Path) -> str:
    """``path`` as the user gave it: the file a symbolic link of a temporary series folder points to."""
    return str(Path(path).resolve()) if Path(path).is_symlink() else str(path)


def _unreadable(path: Path, readable: Sequence[str]) -> str | None:
    """Why GDCM cannot read the header of ``path`` (pydicom tells): an image instance without pixel data, a non-image
    instance (an SR, a presentation state), a transfer syntax GDCM does not know (none of the ``readable`` files
    has it), else a truncated or corrupt file; None when it is no DICOM file."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_file_meta_info

    try:
        ds = pydicom.dcmread(path, defer_size=1024)  # the pixel data left unread
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError):
        return None
    if "Rows" not in ds:
        return f"a DICOM {ds.get('Modality', '')} instance that is no image"
    if "PixelData" not in ds:
        return "an image instance without pixel data (PixelData; a truncated file?)"
    syntax = pydicom.uid.UID(ds.file_meta.get("TransferSyntaxUID", "?"))
    if any(read_file_meta_info(f).get("TransferSyntaxUID") == syntax for f in readable):
        return f"a truncated or corrupt file (GDCM reads its transfer syntax, {syntax.name}, in the others)"
    return f"transfer syntax {syntax.name}, which GDCM cannot read"


def _undecodable(files: Sequence[str]) -> str | None:
    """The first of ``files`` whose transfer syntax ITK's GDCM cannot decode (one slice decoded per transfer
    syntax), in one line with the fix; None when all decode."""
    import itk
    from pydicom.filereader import read_file_meta_info
    from pydicom.uid import UID

    syntaxes: dict[str, str] = {}
    for f in files:
        syntaxes.setdefault(str(read_file_meta_info(f).get("TransferSyntaxUID", "")), f)
    for syntax, f in syntaxes.items():
        try:
            itk.imread(f)
        except RuntimeError:
            return f"{_shown(f)}: transfer syntax {UID(syntax).name}, which no installed decoder reads; {DECODE_FIX}"
    return None


def _position_problem(geometry: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> str | None:
    """What is wrong with the slice positions of a series (file -> origin (3,) mm, direction (3, 3) with the axes as
    columns, pixel spacing (2,) mm): slices off the normal through the first one by more than 0.05 pixel (a gantry
    tilt), or not evenly spaced along it; None when they form a grid."""
    _, direction, spacing = next(iter(geometry.values()))
    normal = np.cross(direction[:, 0], direction[:, 1])
    positions = sorted((float(o @ normal), f) for f, (o, _, _) in geometry.items())
    first = geometry[positions[0][1]][0]
    off = {f: np.abs((geometry[f][0] - first) @ direction[:, :2]) / spacing for _, f in positions}
    worst = max(off, key=lambda f: off[f].max())
    if off[worst].max() > 0.05:
        shift = np.linalg.norm((geometry[worst][0] - first) @ direction[:, :2])
        along = abs(float(geometry[worst][0] @ normal) - positions[0][0])
        return (
            f"{_shown(worst)}: lies {shift:.3g} mm off the slice normal through the first slice, {along:.3g} mm "
            f"away (a gantry tilt of {np.degrees(np.arctan2(shift, along)):.2g} degrees): ITK would read the sheared "
            "slices as an orthogonal volume; export the series without tilt (the scanner's tilt correction) or "
            "resample it to an orthogonal grid (e.g. dcm2niix corrects tilt) and give that file"
        )
    gaps = np.diff([z for z, _ in positions])
    if len(gaps) and (gaps.min() <= 0 or gaps.max() - gaps.min() > 0.01 * np.median(gaps)):
        after = positions[int(np.argmax(gaps))][1]
        return (
            f"{_shown(after)}: the slice positions are not evenly spaced (gaps {gaps.min():g} to {gaps.max():g} "
            "mm, the largest after this file): a slice is missing or doubled; re-export the complete series"
        )
    return None


def case_header(paths: Sequence[str]) -> Volume:
    """One case's files (one, or one per channel) read from their headers (:func:`read_header`) as one volume:
    channels summed, the first file's shape and affine. An :class:`~uniseg_monai.core.errors.InputError` naming the file
    and the fix for a missing, unreadable or non-3D file and for channel files on different grids."""
    problems: list[Problem] = []
    images = [img for img in (_read(p, read_header, problems) for p in paths) if img is not None]
    problems += [problem for problem in map(_not_a_volume, images) if problem]
    if not problems:
        problems += _channel_grid_problems(images)
    if problems:
        raise InputError(f"{problems[0].where}: {problems[0].what}; fix: {problems[0].fix}")
    return Volume(" + ".join(paths), sum(img.channels for img in images), images[0].shape, images[0].affine)


def _check_label(label: Volume, ref: Volume, task: Task, problems: list[Problem], classes: set[int]) -> None:
    if len(label.shape) != 3 or label.channels != 1:
        fix = "save the label as one 3D volume (X, Y, Z) of integer classes"
        problems.append(Problem(label.path, f"label must be one 3D volume, got {label.channels} x {label.shape}", fix))
        return
    difference = grid_difference(label, ref)
    if difference:
        problems.append(
            Problem(
                label.path,
                f"shape / affine differ from image {ref.path}: {difference}",
                "resample the label onto the image grid (nearest neighbour)",
            )
        )
    if label.data is None:
        return
    values = torch.unique(label.data.float())
    if not torch.equal(values, values.round()) or values.min() < 0:
        problems.append(Problem(label.path, "label has non-integer or negative values", "save integer labels"))
        return
    raw = [int(v) for v in values]
    mapped = sorted({task.label_map.get(v, 0) for v in raw}) if task.label_map else raw
    classes.update(mapped)
    outside = [v for v in mapped if v >= task.num_classes]
    if outside:
        problems.append(
            Problem(
                label.path,
                f"label values {outside} outside task {task.name!r}'s {task.num_classes} classes {list(task.labels)}",
                "add a 'label_map' to the task or fix the label file",
            )
        )


def _absolute(value: Any, root: Path) -> Any:
    """An item's path(s) made absolute against the datalist folder; malformed values are returned as they are."""
    if isinstance(value, str) and value:
        return str((root / value).resolve())
    if isinstance(value, list):
        return [_absolute(v, root) for v in value]
    return value


def check_datalist(path: str | Path, progress: bool = True) -> list[Problem]:
    """Every problem of the datalist at ``path`` and its files; an empty list means ready to train."""
    path = Path(path)
    try:
        datalist = read_datalist(path)
        registry = TaskRegistry().extended(datalist.get("tasks", {}))
    except (DatalistError, TaskError) as err:
        message = str(err).removeprefix(f"{path}: ")
        fix = "edit the datalist as the message says (format: README, 'Datalist format')"
        return [Problem(str(path), message, fix)]
    root = path.resolve().parent
    problems = _unknown_sections(datalist, path)
    if not datalist.get("training"):
        fix = 'add a "training" list of {"image", "label", "task"} cases (README: "Datalist format")'
        problems.append(Problem(str(path), "no training cases: the 'training' section is missing or empty", fix))
    used = [(s, i, item) for s in SECTIONS for i, item in enumerate(datalist.get(s, []))]
    known = [item["task"] for _, _, item in used if item["task"] in registry]
    try:
        registry.subset(known)
    except TaskError as err:
        problems.append(Problem(str(path), str(err), "give every task used by the datalist its own id"))
    seen: dict[tuple[str, ...], list[tuple[str, int, str]]] = {}  # image files -> the entries that name them
    trained: dict[str, set[int]] = {}  # task -> the classes its training labels hold
    for section, i, item in progress_bar(used, show=progress, desc="check-data", unit="case"):
        where = f"{path} {section}[{i}]"
        if item["task"] not in registry:
            fix = 'add the task to the datalist\'s "tasks" or correct the name'
            problems.append(Problem(where, f"unknown task {item['task']!r}", fix))
            continue
        item = {**item, **{k: _absolute(item[k], root) for k in ("image", "label") if k in item}}
        images = _paths(item["image"])
        if images:
            entries = seen.setdefault(tuple(sorted(images)), [])
            problems += _repeated(images[0], entries, section, i, item["task"], path)
            entries.append((section, i, item["task"]))
        classes = trained.setdefault(item["task"], set()) if section == "training" else None
        problems += item_problems(item, registry[item["task"]], where, section in LABELLED, classes=classes)
    fix = "check the label files and the task's 'label_map' (raw values it does not list become background)"
    for task, classes in trained.items():
        if classes == {0}:
            problems.append(Problem(str(path), f"no foreground in any training case of task {task!r}", fix))
    return problems


def _unknown_sections(datalist: Mapping[str, Any], path: Path) -> list[Problem]:
    """A problem for each top-level key of ``datalist`` that no tool reads (a misspelt section is ignored by all
    of them), naming the nearest known key."""
    known = ["tasks", *SECTIONS]
    problems = []
    for key in datalist:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1)
            fix = f"rename it to {near[0]!r}" if near else f"remove it (the known keys are {known})"
            problems.append(Problem(str(path), f"unknown top-level key {key!r}: no step reads it", fix))
    return problems


def _repeated(
    image: str, earlier: list[tuple[str, int, str]], section: str, i: int, task: str, path: Path
) -> list[Problem]:
    """The problem of an entry (``section[i]`` of ``task``) whose image ``earlier`` entries already name: a case in
    two splits (training and validation / testing: a flattering score; validation and testing: the test set picks
    the model) or twice in one split for the same task (a duplicate weighs twice); the same image under other tasks
    of one split is fine (several tasks on the same volumes)."""
    for other, j, other_task in earlier:
        if other != section:
            return [
                Problem(
                    image, f"is in both {other}[{j}] and {section}[{i}] of {path}", "keep each case in one split only"
                )
            ]
        if other == section and other_task == task:
            fix = "remove the duplicate entry (a case counts once)"
            return [
                Problem(image, f"is listed twice for task {task!r}: {other}[{j}] and {section}[{i}] of {path}", fix)
            ]
    return []


def check_run_items(
    groups: Sequence[Sequence[Mapping[str, Any]]], registry: TaskRegistry, default: str = "", labelled: bool = True
) -> None:
    """Header-level :func:`item_problems` of the items a bundle run reads (lists of items with absolute paths and
    labels, e.g. training and validation; ``default``: the task of items that name none; ``labelled``: they need a
    label, else only their images are checked, as inference reads them); an
    :class:`~uniseg_monai.core.errors.InputError` naming the first problem and how many there are."""
    items = [item for group in groups for item in group]
    problems: list[Problem] = []
    for i, item in enumerate(progress_bar(items, show=len(items) >= 500, desc="checking files", unit="case")):
        where = f"case {i} ({item.get('image')})"
        if not labelled:
            item = {k: v for k, v in item.items() if k != "label"}
        problems += item_problems(item, resolve_task(item, registry, default), where, labelled, read_header)
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more problem(s); `uniseg check-data DATALIST` lists them all)"
        raise InputError(f"{first.where}: {first.what}; fix: {first.fix}" + (more if len(problems) > 1 else ""))
