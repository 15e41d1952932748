"""``uniseg check-data``: validate a datalist and its files before training (nnU-Net integrity-check style)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import LoadImage
from tqdm import tqdm

from uniseg_monai.data.datalist import SECTIONS, DatalistError, read_datalist
from uniseg_monai.tasks import Task, TaskError, TaskRegistry


@dataclass(frozen=True)
class Problem:
    where: str  # the file (or datalist entry) at fault
    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}\n    fix: {self.fix}"


_load = LoadImage(image_only=True, ensure_channel_first=True)


def _read(path: str, problems: list[Problem]) -> torch.Tensor | None:
    if not Path(path).exists():
        problems.append(Problem(path, "file not found", "correct the path (relative paths start at the datalist)"))
        return None
    try:
        return _load(path)
    except Exception as err:  # any reader failure means the file cannot be used
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        problems.append(Problem(path, f"unreadable or corrupt ({first[:200]})", "re-export or replace the file"))
        return None


def _check_image(path: str, img: torch.Tensor, problems: list[Problem]) -> bool:
    if img.ndim != 4:
        problems.append(Problem(path, f"not a 3D volume (shape {tuple(img.shape)})", "provide 3D images"))
        return False
    arr = img.float()
    if not torch.isfinite(arr).all():
        problems.append(Problem(path, "contains NaN or Inf intensities", "fix the export or replace the voxels"))
    elif arr.numel() == 0 or arr.max() == arr.min():
        problems.append(Problem(path, "empty or constant image", "check the export; a constant image is unusable"))
    return True


def _same_grid(a: torch.Tensor, b: torch.Tensor) -> bool:
    return tuple(a.shape[1:]) == tuple(b.shape[1:]) and np.allclose(
        np.asarray(a.affine), np.asarray(b.affine), atol=1e-3
    )


def _check_item(item: dict, task: Task, root: Path, problems: list[Problem]) -> None:
    paths = item["image"] if isinstance(item["image"], list) else [item["image"]]
    paths = [str((root / p).resolve()) for p in paths]
    images = []
    for path in paths:
        img = _read(path, problems)
        if img is not None and _check_image(path, img, problems):
            images.append((path, img))
    if len(images) != len(paths):
        return
    ref_path, ref = images[0]
    for path, img in images[1:]:
        if not _same_grid(img, ref):
            problems.append(Problem(path, f"channel file does not match {ref_path} in shape or affine", "resample"))
    channels = sum(img.shape[0] for _, img in images)
    if channels != task.in_channels:
        problems.append(
            Problem(
                ", ".join(paths),
                f"{channels} channel(s), task {task.name!r} expects {task.in_channels} ({'+'.join(task.modalities)})",
                "list one file per modality in the task's order, or use the right task",
            )
        )
    if "label" not in item:
        return
    label_path = str((root / item["label"]).resolve())
    label = _read(label_path, problems)
    if label is None:
        return
    if label.ndim != 4 or label.shape[0] != 1:
        problems.append(Problem(label_path, f"label must be one 3D volume, got shape {tuple(label.shape)}", "fix"))
        return
    if not _same_grid(label, ref):
        problems.append(
            Problem(
                label_path,
                f"shape {tuple(label.shape[1:])} / affine differ from image {ref_path} {tuple(ref.shape[1:])}",
                "resample the label onto the image grid (nearest neighbour)",
            )
        )
    values = torch.unique(label.float())
    if not torch.equal(values, values.round()) or values.min() < 0:
        problems.append(Problem(label_path, "label has non-integer or negative values", "save integer labels"))
        return
    raw = [int(v) for v in values]
    mapped = sorted({task.label_map.get(v, 0) for v in raw}) if task.label_map else raw
    outside = [v for v in mapped if v >= task.num_classes]
    if outside:
        problems.append(
            Problem(
                label_path,
                f"label values {outside} outside task {task.name!r}'s {task.num_classes} classes {list(task.labels)}",
                "add a 'label_map' to the task or fix the label file",
            )
        )


def check_datalist(path: str | Path, progress: bool = True) -> list[Problem]:
    """Every problem of the datalist at ``path`` and its files; an empty list means ready to train."""
    path = Path(path)
    try:
        datalist = read_datalist(path)
        registry = TaskRegistry().extended(datalist.get("tasks", {}))
    except (DatalistError, TaskError) as err:
        return [Problem(str(path), str(err), "fix the datalist")]
    root = path.resolve().parent
    problems: list[Problem] = []
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
        images = item["image"] if isinstance(item["image"], list) else [item["image"]]
        key = tuple(sorted(str((root / p).resolve()) for p in images))
        first = seen.setdefault(key, section)
        if (first == "training") != (section == "training"):
            problems.append(
                Problem(where, f"the same image is in {first} and {section}", "keep each case in one split only")
            )
        _check_item(item, registry[item["task"]], root, problems)
    return problems
