"""``uniseg prepare``: datalists from Medical Segmentation Decathlon and nnU-Net-raw folders, and from the
public downstream releases: BTCV (Synapse ``RawData``: ``Training/img/imgNNNN.nii.gz`` +
``Training/label/labelNNNN.nii.gz``) and Vestibular-Schwannoma-SEG converted to NIfTI (``vs_gk_<n>/`` with
``vs_gk_t1_refT1.nii.gz`` + ``vs_gk_seg_refT1.nii.gz``, the layout of the dataset authors' conversion)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from uniseg_monai.core.atomic import write_text_atomic
from uniseg_monai.core.errors import UsageError
from uniseg_monai.core.json_files import read_json
from uniseg_monai.data.check import case_header
from uniseg_monai.data.datalist import DatalistError, read_datalist
from uniseg_monai.tasks import Task, TaskError, TaskRegistry, check_task_name


def _msd_cases(source: Path, meta: dict) -> tuple[list[dict], list[dict]]:
    train = [{"image": e["image"], "label": e["label"]} for e in meta.get("training", [])]
    test = [{"image": e if isinstance(e, str) else e["image"]} for e in meta.get("test", [])]
    return train, test


def _nnunet_cases(source: Path, meta: dict) -> tuple[list[dict], list[dict]]:
    ending = meta.get("file_ending", ".nii.gz")
    n_channels = len(meta.get("channel_names", meta.get("modality", {"0": ""})))

    def cases(folder: str) -> list[str]:
        pattern = re.compile(rf"(.+)_(\d{{4}}){re.escape(ending)}$")
        names = {m.group(1) for p in (source / folder).glob(f"*{ending}") if (m := pattern.match(p.name))}
        return sorted(names)

    def images(folder: str, case: str) -> str | list[str]:
        files = [f"./{folder}/{case}_{c:04d}{ending}" for c in range(n_channels)]
        return files[0] if n_channels == 1 else files

    train = [{"image": images("imagesTr", c), "label": f"./labelsTr/{c}{ending}"} for c in cases("imagesTr")]
    test = [{"image": images("imagesTs", c)} for c in cases("imagesTs")] if (source / "imagesTs").exists() else []
    return train, test


def _btcv_cases(source: Path, meta: dict) -> tuple[list[dict], list[dict]]:
    folder = source / "Training" if (source / "Training").is_dir() else source
    train = []
    for img in sorted((folder / "img").glob("img*.nii.gz")):
        label = folder / "label" / img.name.replace("img", "label", 1)
        if not label.exists():
            raise DatalistError(f"{img}: no label {label}; BTCV needs Training/img/imgNNNN + Training/label/labelNNNN")
        train.append({"image": str(img.relative_to(source)), "label": str(label.relative_to(source))})
    return train, []


def _vs_cases(source: Path, meta: dict) -> tuple[list[dict], list[dict]]:
    train = []
    for case in sorted((p for p in source.glob("vs_gk_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[-1])):
        image, label = case / "vs_gk_t1_refT1.nii.gz", case / "vs_gk_seg_refT1.nii.gz"
        if not (image.exists() and label.exists()):
            raise DatalistError(f"{case}: needs vs_gk_t1_refT1.nii.gz and vs_gk_seg_refT1.nii.gz")
        item = {"image": str(image.relative_to(source)), "label": str(label.relative_to(source))}
        train.append(item | {"case": case.name})  # every case's files have the same names
    return train, []


def _read_meta(path: Path) -> dict[str, Any]:
    """The dataset.json at ``path``; a :class:`DatalistError` naming it and the key for content prepare cannot
    read: invalid JSON, "labels" that map neither values to names (MSD) nor names to values (nnU-Net v2),
    "modality" / "channel_names" that are no object, "training" entries without "image" and "label" paths, "test"
    entries without an image path."""
    try:
        meta = read_json(path)
    except json.JSONDecodeError as err:
        raise DatalistError(f"{path}: not valid JSON ({err}); repair or re-export it") from None
    if not isinstance(meta, dict):
        raise DatalistError(
            f"{path}: expected a JSON object (an MSD / nnU-Net dataset.json), got {type(meta).__name__}"
        )
    labels = meta.get("labels", {})
    if not isinstance(labels, dict) or not (
        all(k.isdigit() and isinstance(v, str) for k, v in labels.items())
        or all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values())
    ):
        raise DatalistError(
            f'{path}: "labels" must map label values to names ({{"0": "background", "1": "liver"}}, MSD) or names '
            f'to values ({{"background": 0, "liver": 1}}, nnU-Net v2), got {labels!r:.200}'
        )
    for key in ("modality", "channel_names"):
        if not isinstance(meta.get(key, {}), dict):
            raise DatalistError(f'{path}: "{key}" must map channel numbers to names ({{"0": "CT"}}), got {meta[key]!r}')
    for i, entry in enumerate(meta.get("training", [])):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("image", "label")):
            raise DatalistError(f'{path}: training[{i}] needs "image" and "label" file paths, got {entry!r:.200}')
    for i, entry in enumerate(meta.get("test", [])):
        if not isinstance(entry, str) and not (isinstance(entry, dict) and isinstance(entry.get("image"), str)):
            raise DatalistError(
                f'{path}: test[{i}] must be an image path (or an object with "image"), got {entry!r:.200}'
            )
    return meta


def _fraction(value: Any, option: str) -> float:
    """``value`` if it is a share of the cases, a number in [0, 1); else a :class:`UsageError` naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise UsageError(
            f"{option} must be a number from 0 up to (not including) 1, a share of the cases; got {value!r}"
        )
    return float(value)


def _checked_task(spec: dict[str, Any], task: str, source: Path) -> dict[str, Any]:
    """``spec`` if the registry accepts it as ``task`` (:meth:`TaskRegistry.extended`), so that prepare never writes
    a datalist its own checks refuse; else a :class:`DatalistError` naming ``source`` and the key to fix there."""
    try:
        TaskRegistry().extended({task: spec})
    except TaskError as err:
        key = next((k for k in _META_KEYS if k in str(err)), "")
        raise DatalistError(f"{source}: {err}; fix {_META_KEYS[key]}") from None
    return spec


def _check_channels(source: Path, case: dict[str, Any], task: Task, fix: str) -> None:
    """A :class:`DatalistError` naming ``source``, the case's image, the task and ``fix`` if the channel count of its
    headers (files x 4th axis) is not the task's modality count: the datalist checks would refuse every case."""
    images = case["image"] if isinstance(case["image"], list) else [case["image"]]
    channels = case_header([str(source / f) for f in images]).channels
    if channels != task.in_channels:
        raise DatalistError(
            f"{source}: {images[0]} has {channels} channel(s), but task {task.name!r} expects {task.in_channels} "
            f"({'+'.join(task.modalities)}); {fix}"
        )


# a task key that prepare's task entry refuses -> where it came from
_META_KEYS = {
    "modalities": 'its "modality" (nnU-Net v2: "channel_names")',
    "labels": 'its "labels"',
    "spacing": "the voxel sizes in the training images' headers",
    "": 'its "modality" / "labels"',
}


# format -> (case reader, needs dataset.json, share of the labelled cases kept for testing: the paper's splits)
FORMATS = {
    "msd": (_msd_cases, True, 0.0),
    "nnunet": (_nnunet_cases, True, 0.0),
    "btcv": (_btcv_cases, False, 9 / 30),  # 21 train / 9 test
    "vs": (_vs_cases, False, 49 / 242),  # 193 train / 49 test
}


def _task_spec(source: Path, meta: dict, train: list[dict], fmt: str) -> dict[str, Any]:
    """A task entry from dataset.json (or the built-in task of a ``btcv``/``vs`` release): modalities, labels,
    median spacing (x, y, z) of the training images."""
    first = [c["image"][0] if isinstance(c["image"], list) else c["image"] for c in train[:20]]
    spacings = [nib.load(source / f).header.get_zooms()[:3] for f in first]
    spacing = [round(float(s), 3) for s in np.median(np.array(spacings), axis=0)]
    if fmt in ("btcv", "vs"):
        builtin = TaskRegistry()[fmt].to_json()
        return {k: v for k, v in builtin.items() if k != "id"} | {"spacing": spacing}
    modalities = list((meta.get("channel_names") or meta.get("modality") or {"0": "CT"}).values())
    labels = meta.get("labels", {})
    if labels and all(isinstance(v, int) for v in labels.values()):  # nnU-Net v2: name -> value
        labels = {str(v): k for k, v in labels.items()}
    names = [labels[k] for k in sorted(labels, key=int)]
    return {
        "modalities": modalities,
        "labels": names,
        "spacing": spacing,
        "normalization": ["ct" if m.upper() == "CT" else "zscore" for m in modalities],
    }


def _relative(value: str | list[str], source: Path, out_dir: Path) -> str | list[str]:
    if isinstance(value, list):
        return [_relative(v, source, out_dir) for v in value]  # type: ignore[misc]
    return os.path.relpath((source / value).resolve(), out_dir.resolve())


def _existing_datalist(out: Path) -> dict[str, Any]:
    """The datalist OUT that ``prepare`` merges into; one line saying it is OUT when it is no datalist."""
    if out.is_dir():
        raise UsageError(
            f"OUT {out} is a folder: give the datalist file to create or add to, e.g. {out / 'datalist.json'}"
        )
    try:
        return read_datalist(out)
    except DatalistError as err:
        raise DatalistError(
            f"OUT {out} exists and is not a datalist to add to ({str(err).removeprefix(f'{out}: ')}): give a new file "
            "or an existing datalist"
        ) from None


def prepare(
    source: str | Path,
    task: str,
    out: str | Path,
    fmt: str = "msd",
    val_fraction: float = 0.2,
    test_fraction: float | None = None,
) -> dict[str, int]:
    """Add the cases of one release folder as ``task`` to the datalist ``out`` (created or merged).

    Formats: ``msd``, ``nnunet`` (with dataset.json), ``btcv``, ``vs`` (see the module docstring). Entries of
    ``task`` already in ``out`` are replaced, everything else is kept. A task unknown to the registry gets a
    ``"tasks"`` entry (from dataset.json, or the built-in btcv/vs task) with the data's median spacing. The
    last ``test_fraction`` of the sorted labelled cases become testing (default: the paper's split for btcv/vs,
    none otherwise; MSD/nnU-Net test images are listed without labels), the last ``val_fraction`` of the rest
    validation.
    """
    check_task_name(task, "--task")
    source, out = Path(source), Path(out)
    if fmt not in FORMATS:
        raise DatalistError(f"--format must be one of {sorted(FORMATS)}, got {fmt!r}")
    read_cases, needs_meta, default_test = FORMATS[fmt]
    meta_path = source / "dataset.json"
    if needs_meta and not meta_path.exists():
        raise DatalistError(f"{meta_path} not found: --source must be an MSD or nnU-Net-raw task folder")
    val_fraction = _fraction(val_fraction, "--val_fraction")
    test_share = _fraction(default_test if test_fraction is None else test_fraction, "--test_fraction")
    meta = _read_meta(meta_path) if needs_meta else {}
    train, test = read_cases(source, meta)
    if not train:
        raise DatalistError(f"{source}: no training cases found for format {fmt!r}")
    datalist = (
        _existing_datalist(out) if out.exists() else {"tasks": {}, "training": [], "validation": [], "testing": []}
    )
    fix = "give the task these images are for, or a new --task name (defined from dataset.json)"
    if task not in TaskRegistry() and task not in datalist.get("tasks", {}):
        spec = _task_spec(source, meta, train, fmt)
        datalist.setdefault("tasks", {})[task] = _checked_task(spec, task, meta_path if needs_meta else source)
        fix = f'fix "modality" in {meta_path} (nnU-Net v2: "channel_names")'
    _check_channels(source, train[0], TaskRegistry().extended(datalist.get("tasks", {}))[task], fix)
    n_cases, n_test = len(train), round(len(train) * test_share)
    train, test = train[: len(train) - n_test], train[len(train) - n_test :] + test
    n_val = round(len(train) * val_fraction) if len(train) > 1 else 0
    if n_val >= len(train):
        raise UsageError(
            f"--test_fraction {test_share:g} and --val_fraction {val_fraction:g} leave none of the {n_cases} labelled "
            "cases for training; lower them"
        )
    splits = {"training": train[: len(train) - n_val], "validation": train[len(train) - n_val :], "testing": test}
    counts = {}
    for section, cases in splits.items():
        kept = [e for e in datalist.get(section, []) if e["task"] != task]
        new = [
            {k: _relative(v, source, out.parent) if k in ("image", "label") else v for k, v in c.items()}
            | {"task": task}
            for c in cases
        ]
        datalist[section] = kept + new
        counts[section] = len(new)
    write_text_atomic(out, json.dumps(datalist, indent=1))
    return counts
