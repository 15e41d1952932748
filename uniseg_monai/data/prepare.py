"""``uniseg prepare``: datalists from Medical Segmentation Decathlon and nnU-Net-raw folders."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from uniseg_monai.atomic import write_text_atomic
from uniseg_monai.data.datalist import DatalistError, read_datalist
from uniseg_monai.tasks import TaskRegistry


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


def _task_spec(source: Path, meta: dict, train: list[dict]) -> dict[str, Any]:
    """A task entry from dataset.json: modalities, labels, median spacing (x, y, z) of the training images."""
    modalities = list((meta.get("channel_names") or meta.get("modality") or {"0": "CT"}).values())
    labels = meta.get("labels", {})
    if labels and all(isinstance(v, int) for v in labels.values()):  # nnU-Net v2: name -> value
        labels = {str(v): k for k, v in labels.items()}
    names = [labels[k] for k in sorted(labels, key=int)]
    first = [c["image"][0] if isinstance(c["image"], list) else c["image"] for c in train[:20]]
    spacings = [nib.load(source / f).header.get_zooms()[:3] for f in first]
    return {
        "modalities": modalities,
        "labels": names,
        "spacing": [round(float(s), 3) for s in np.median(np.array(spacings), axis=0)],
        "normalization": ["ct" if m.upper() == "CT" else "zscore" for m in modalities],
    }


def _relative(value: str | list[str], source: Path, out_dir: Path) -> str | list[str]:
    if isinstance(value, list):
        return [_relative(v, source, out_dir) for v in value]  # type: ignore[misc]
    return os.path.relpath((source / value).resolve(), out_dir.resolve())


def prepare(
    source: str | Path, task: str, out: str | Path, fmt: str = "msd", val_fraction: float = 0.2
) -> dict[str, int]:
    """Add the cases of one MSD / nnU-Net-raw folder as ``task`` to the datalist ``out`` (created or merged).

    Entries of ``task`` already in ``out`` are replaced, everything else is kept. A task unknown to the
    registry gets a ``"tasks"`` entry from dataset.json (modalities, labels, median spacing). The last
    ``val_fraction`` of the sorted training cases become validation.
    """
    source, out = Path(source), Path(out)
    meta_path = source / "dataset.json"
    if not meta_path.exists():
        raise DatalistError(f"{meta_path} not found: --source must be an MSD or nnU-Net-raw task folder")
    if fmt not in ("msd", "nnunet"):
        raise DatalistError(f"--format must be msd or nnunet, got {fmt!r}")
    meta = json.loads(meta_path.read_text())
    train, test = (_msd_cases if fmt == "msd" else _nnunet_cases)(source, meta)
    if not train:
        raise DatalistError(f"{source}: no training cases found for format {fmt!r}")
    datalist = read_datalist(out) if out.exists() else {"tasks": {}, "training": [], "validation": [], "testing": []}
    if task not in TaskRegistry() and task not in datalist.get("tasks", {}):
        datalist.setdefault("tasks", {})[task] = _task_spec(source, meta, train)
    n_val = round(len(train) * val_fraction) if len(train) > 1 else 0
    splits = {"training": train[: len(train) - n_val], "validation": train[len(train) - n_val :], "testing": test}
    counts = {}
    for section, cases in splits.items():
        kept = [e for e in datalist.get(section, []) if e["task"] != task]
        new = [{k: _relative(v, source, out.parent) for k, v in c.items()} | {"task": task} for c in cases]
        datalist[section] = kept + new
        counts[section] = len(new)
    write_text_atomic(out, json.dumps(datalist, indent=1))
    return counts
