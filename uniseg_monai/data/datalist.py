"""The datalist: a JSON file naming tasks, cases and their files (format in README.md)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from uniseg_monai.core.atomic import is_file_name
from uniseg_monai.core.errors import UniSegError
from uniseg_monai.core.json_files import read_json
from uniseg_monai.tasks import TaskRegistry, check_task_name

SECTIONS = ("training", "validation", "testing")


class DatalistError(UniSegError, ValueError):
    """A datalist that cannot be read or used."""


def read_datalist(path: str | Path) -> dict[str, Any]:
    """The raw datalist JSON, with a clear error for a missing or malformed file or a task name that breaks
    :data:`~uniseg_monai.tasks.TASK_NAME_RULE` (in "tasks" or an item's "task")."""
    path = Path(path)
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise DatalistError(
            f"{path}: datalist not found; check the path (bundles: --dataset_dir is the folder holding datalist.json)"
        ) from None
    except json.JSONDecodeError as err:
        raise DatalistError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not any(s in data for s in (*SECTIONS, "tasks")):
        raise DatalistError(f"{path}: expected an object with 'training', 'validation', 'testing' and/or 'tasks'")
    tasks = data.get("tasks", {})
    if not isinstance(tasks, dict) or not all(isinstance(spec, dict) for spec in tasks.values()):
        raise DatalistError(
            f'{path}: "tasks" must map task names to objects of task keys (README: "Datalist format"), got '
            f"{tasks!r:.200}"
        )
    for name in tasks:
        check_task_name(name, f'{path}: "tasks"')
    for section in SECTIONS:
        if not isinstance(data.get(section, []), list):
            raise DatalistError(
                f'{path}: "{section}" must be a list of items ({{"image", "label", "task"}} objects), got '
                f"{data[section]!r:.100}"
            )
        for i, item in enumerate(data.get(section, [])):
            if not isinstance(item, dict) or "image" not in item or "task" not in item:
                raise DatalistError(f"{path}: {section}[{i}] needs 'image' and 'task' (got {item!r})")
            check_task_name(item["task"], f"{path}: {section}[{i}]")
            image, label = item["image"], item.get("label", "")
            if not (_is_path(image) or (isinstance(image, list) and image and all(map(_is_path, image)))):
                raise DatalistError(
                    f"{path}: {section}[{i}]: 'image' must be a file path or a list of paths (one per channel), got "
                    f"{image!r}"
                )
            if "label" in item and not _is_path(label):
                raise DatalistError(f"{path}: {section}[{i}]: 'label' must be one file path, got {label!r}")
            if "case" in item and not is_file_name(item["case"]):
                raise DatalistError(
                    f"{path}: {section}[{i}]: 'case' {item['case']!r} must be a file name (no folder part, not '.' "
                    "or '..'): it names the case's output files; rename it"
                )
    return data


def _is_path(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _absolute(value: str | list[str], root: Path) -> str | list[str]:
    if isinstance(value, list):
        return [str((root / v).resolve()) for v in value]
    return str((root / value).resolve())


def load_items(
    path: str | Path, section: str, registry: TaskRegistry, task: str | None = None, only: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Items of one section with absolute paths and ``task`` (name); pre-processing adds ``task_id``
    (:class:`~uniseg_monai.data.transforms.ResolveTaskd`).

    ``registry`` must know every task the section uses (see :func:`uniseg_monai.engine.wiring.registry_for_datalist`);
    an unknown task fails here, before any image is read.
    ``task``: segment every item as this task instead of the item's own (a bundle's ``--task``).
    ``only``: the items of these tasks only (others are not checked).
    """
    if section not in SECTIONS:
        raise DatalistError(f"section must be one of {SECTIONS}, got {section!r}")
    root = Path(path).resolve().parent
    items = []
    for item in read_datalist(path).get(section, []):
        if only is not None and item["task"] not in only:
            continue
        out = dict(item)
        for key in ("image", "label"):
            if key in out:
                out[key] = _absolute(out[key], root)
        out["task"] = registry[task or out["task"]].name  # an unknown task raises TaskError naming the known ones
        items.append(out)
    return items


def task_items(path: str | Path, section: str, registry: TaskRegistry, task: str) -> list[dict[str, Any]]:
    """The items of ``section`` that belong to ``task`` (a single-task bundle's data); an empty ``training``
    section is an error naming the tasks the datalist does hold."""
    items = load_items(path, section, registry)
    chosen = [item for item in items if item["task"] == task]
    if section == "training" and not chosen:
        found = sorted({item["task"] for item in items})
        raise DatalistError(f"{path}: no training items of task {task!r} (found {found}); set the bundle id `task`")
    return chosen


def inference_items(
    path: str | Path, section: str, registry: TaskRegistry, task: str, dataset_dir: str | Path
) -> list[dict[str, Any]]:
    """What an inference run segments: the datalist's ``section`` when the datalist exists (every item as
    ``task`` if given), else every ``*.nii.gz`` directly in ``dataset_dir`` or its ``imagesTs/`` (the MONAI
    model-zoo layout), to be segmented as ``task``; no data at all gives no items (model-zoo CI checks a bundle so).
    """
    if Path(path).is_file():
        return load_items(path, section, registry, task=task or None)
    folder = Path(dataset_dir)
    images = sorted(folder.glob("*.nii.gz")) + sorted(folder.glob("imagesTs/*.nii.gz"))
    return [{"image": str(p.resolve()), **({"task": registry[task].name} if task else {})} for p in images]
