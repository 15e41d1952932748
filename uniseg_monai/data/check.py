"""Data checks before training (nnU-Net integrity-check style).

``uniseg check-data`` (:func:`check_datalist`) reads every voxel; a bundle run checks the items it uses from the
file headers only (:func:`check_run_items`, milliseconds per case) before any data is cached, so a bad file fails in
seconds, not hours into a run. Both apply the same per-item rules (:func:`item_problems`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data.utils import correct_nifti_header_if_necessary
from monai.transforms import LoadImage
from tqdm import tqdm

from uniseg_monai.data.datalist import SECTIONS, DatalistError, read_datalist
from uniseg_monai.data.geometry import geometry_problem
from uniseg_monai.errors import InputError
from uniseg_monai.tasks import Task, TaskError, TaskRegistry, resolve_task

LABELLED = ("training", "validation")  # sections whose items need a label (training, Dice during training)


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
    affine (RAS, mm) and, when read fully, the voxels (C, X, Y, Z)."""

    path: str
    channels: int
    shape: tuple[int, ...]
    affine: np.ndarray
    data: torch.Tensor | None = None


_NIFTI = (".nii", ".nii.gz")


@functools.cache
def _loader() -> LoadImage:
    return LoadImage(image_only=True, ensure_channel_first=True)  # built on first use: MONAI's readers log at creation


def read_volume(path: str) -> Volume:
    """Every voxel of ``path`` (as the bundles load it)."""
    img = _loader()(path)
    return Volume(path, int(img.shape[0]), tuple(img.shape[1:]), np.asarray(img.affine), img)


def read_header(path: str) -> Volume:
    """Channels, shape and affine of ``path`` from its header (NIfTI via nibabel, other formats via ITK); no voxels."""
    if path.endswith(_NIFTI):
        img = correct_nifti_header_if_necessary(nib.load(path))  # as MONAI's NibabelReader does
        shape = tuple(int(s) for s in img.shape)
        channels = int(np.prod(shape[3:])) if len(shape) > 3 else 1
        return Volume(path, channels, shape[:3] if len(shape) > 3 else shape, np.asarray(img.affine))
    import itk

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
    return Volume(path, int(io.GetNumberOfComponents()), shape, affine)


def _read(path: str, read: Callable[[str], Volume], problems: list[Problem]) -> Volume | None:
    if not Path(path).exists():
        problems.append(Problem(path, "file not found", "correct the path (relative paths start at the datalist)"))
        return None
    try:
        return read(path)
    except Exception as err:  # any reader failure means the file cannot be used
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        problems.append(Problem(path, f"unreadable or corrupt ({first[:200]})", "re-export or replace the file"))
        return None


def _check_image(img: Volume, task: Task, problems: list[Problem]) -> bool:
    if len(img.shape) != 3:
        problems.append(Problem(img.path, f"not a 3D volume (shape {img.shape})", "provide 3D images"))
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


def _same_grid(a: Volume, b: Volume) -> bool:
    return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=1e-3)


def _paths(value: Any) -> list[str] | None:
    """The file(s) of an item's ``image`` (a path or a list, one per channel) or ``label``; None if malformed."""
    paths = value if isinstance(value, list) else [value]
    return [str(p) for p in paths] if paths and all(isinstance(p, str) and p for p in paths) else None


def item_problems(
    item: Mapping[str, Any], task: Task, where: str, labelled: bool, read: Callable[[str], Volume] = read_volume
) -> list[Problem]:
    """Every problem of one item (absolute paths) of ``task``; ``where`` names the entry, ``labelled``: it needs a
    label; ``read``: :func:`read_volume` (voxel checks too) or :func:`read_header` (header checks only)."""
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
    for img in images[1:]:
        if not _same_grid(img, ref):
            problems.append(Problem(img.path, f"channel file does not match {ref.path} in shape or affine", "resample"))
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
            _check_label(label, ref, task, problems)
    return problems


def _check_label(label: Volume, ref: Volume, task: Task, problems: list[Problem]) -> None:
    if len(label.shape) != 3 or label.channels != 1:
        fix = "save the label as one 3D volume (X, Y, Z) of integer classes"
        problems.append(Problem(label.path, f"label must be one 3D volume, got {label.channels} x {label.shape}", fix))
        return
    if not _same_grid(label, ref):
        problems.append(
            Problem(
                label.path,
                f"shape {label.shape} / affine differ from image {ref.path} {ref.shape}",
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
    problems: list[Problem] = []
    if not datalist.get("training"):
        fix = 'add a "training" list of {"image", "label", "task"} cases (README: "Datalist format")'
        problems.append(Problem(str(path), "no training cases: the 'training' section is missing or empty", fix))
    used = [(s, i, item) for s in SECTIONS for i, item in enumerate(datalist.get(s, []))]
    known = [item["task"] for _, _, item in used if item["task"] in registry]
    try:
        registry.subset(known)
    except TaskError as err:
        problems.append(Problem(str(path), str(err), "give every task used by the datalist its own id"))
    seen: dict[tuple[str, ...], str] = {}
    for section, i, item in tqdm(used, desc="check-data", unit="case", disable=not progress):
        where = f"{path} {section}[{i}]"
        if item["task"] not in registry:
            fix = 'add the task to the datalist\'s "tasks" or correct the name'
            problems.append(Problem(where, f"unknown task {item['task']!r}", fix))
            continue
        item = {**item, **{k: _absolute(item[k], root) for k in ("image", "label") if k in item}}
        images = _paths(item["image"])
        if images:
            first = seen.setdefault(tuple(sorted(images)), f"{section}[{i}]")
            if first != f"{section}[{i}]" and (first.startswith("training")) != (section == "training"):
                fix = "keep each case in one split only"
                problems.append(Problem(images[0], f"is in both {first} and {section}[{i}] of {path}", fix))
        problems += item_problems(item, registry[item["task"]], where, labelled=section in LABELLED)
    return problems


def check_run_items(groups: Sequence[Sequence[Mapping[str, Any]]], registry: TaskRegistry, default: str = "") -> None:
    """Header-level :func:`item_problems` of the items a bundle run reads (lists of items with absolute paths and
    labels, e.g. training and validation; ``default``: the task of items that name none); an
    :class:`~uniseg_monai.errors.InputError` naming the first problem and how many there are."""
    items = [item for group in groups for item in group]
    problems: list[Problem] = []
    for i, item in enumerate(tqdm(items, desc="checking files", unit="case", disable=len(items) < 500)):
        where = f"case {i} ({item.get('image')})"
        problems += item_problems(item, resolve_task(item, registry, default), where, True, read_header)
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more problem(s); `uniseg check-data DATALIST` lists them all)"
        raise InputError(f"{first.where}: {first.what}; fix: {first.fix}" + (more if len(problems) > 1 else ""))
