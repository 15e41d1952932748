"""A bundle's ``metadata.json`` ``network_data_format``, generated from its model's task table.

The inputs (image channels, the task index of a UniSeg), the output channels and the window shape follow from the
bundle's ``models/tasks.json`` and the network of its ``configs/inference.json``; ``uniseg tasks --metadata BUNDLE``
writes them, and a test checks that every committed ``metadata.json`` equals what this module generates.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from uniseg_monai.apps.bundles import INFERENCE_CONFIG, find_bundle
from uniseg_monai.core.atomic import write_text_atomic
from uniseg_monai.core.errors import UsageError
from uniseg_monai.core.json_files import read_json
from uniseg_monai.tasks import Task, TaskRegistry, load_model_tasks

METADATA = Path("configs") / "metadata.json"


def channel_def(registry: TaskRegistry) -> dict[str, str]:
    """``channel_def`` of the network output: channel k is label k of the ongoing task (the label name itself for a
    one-task bundle; ``task: label | ...`` over the tasks otherwise)."""
    tasks = sorted(registry.values(), key=lambda t: t.id)
    out = {"0": "background"}
    for k in range(1, registry.num_classes):
        names = [(t.name, t.labels[k]) for t in tasks if k < t.num_classes]
        out[str(k)] = names[0][1] if len(tasks) == 1 else " | ".join(f"{t}: {label}" for t, label in names)
    return out


def _modality(task: Task) -> str:
    """CT, PET/CT or MR (any other sequence) for the metadata's ``modality``."""
    names = {m.upper() for m in task.modalities}
    return "PET/CT" if names == {"CT", "PET"} else "CT" if names == {"CT"} else "PET" if names == {"PET"} else "MR"


def _image(tasks: list[Task]) -> tuple[str, int, dict[str, str]]:
    """``modality``, ``num_channels`` and ``channel_def`` of the image input: the task's channels for one task;
    for several, one channel with a note per channel count."""
    kinds = list(dict.fromkeys(_modality(t) for t in tasks))
    if len(tasks) == 1:
        return kinds[0], tasks[0].in_channels, dict(enumerate(tasks[0].modalities))
    modality = kinds[0] if len(kinds) == 1 else f"{', '.join(kinds[:-1])} or {kinds[-1]} (per task)"
    by_count: dict[int, list[str]] = {}
    for t in tasks:
        by_count.setdefault(t.in_channels, [])
        if t.in_channels > 1 and ", ".join(t.modalities) not in by_count[t.in_channels]:
            by_count[t.in_channels].append(", ".join(t.modalities))
    notes = [f"{n}-channel tasks" if n == 1 else f"{n} = {' / '.join(sets)}" for n, sets in sorted(by_count.items())]
    return modality, min(by_count), {"0": f"image ({'; '.join(notes)})"}


def network_data_format(registry: TaskRegistry, total_stride: list[int], task_input: bool) -> dict[str, Any]:
    """``network_data_format`` of a network with ``total_stride`` (x, y, z) for the tasks of ``registry``;
    ``task_input``: the network takes a ``task_id`` (UniSeg), not only the image (the downstream backbone)."""
    tasks = sorted(registry.values(), key=lambda t: t.id)
    modality, channels, image_channels = _image(tasks)
    shape = [f"{s}*n" for s in total_stride]
    patch = {"spatial_shape": shape, "dtype": "float32", "value_range": [], "is_patch_data": True}
    inputs: dict[str, Any] = {
        "image": {"type": "image", "format": "magnitude", "modality": modality, "num_channels": channels, **patch,
                  "channel_def": {str(k): v for k, v in image_channels.items()}},
    }  # fmt: skip
    if task_input:
        ids = [t.id for t in tasks]
        inputs["task_id"] = {
            "type": "tensor", "format": "task index", "num_channels": 1, "spatial_shape": [], "dtype": "int64",
            "value_range": [min(ids), max(ids)], "channel_def": {str(t.id): t.name for t in tasks},
        }  # fmt: skip
    pred = {"type": "image", "format": "segmentation", "num_channels": registry.num_classes, **patch,
            "channel_def": channel_def(registry)}  # fmt: skip
    return {"inputs": inputs, "outputs": {"pred": pred}}


def _read_json(path: Path) -> Any:
    try:
        return read_json(path)
    except FileNotFoundError:
        raise UsageError(f"{path} not found: every bundle has it") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: not valid JSON ({err}); fix the file") from None


def _total_stride(strides: Any, path: Path) -> list[int]:
    """The product of the per-stage strides per axis; ``strides``: [x, y, z] integer lists or integers."""
    stages = [[s] * 3 if isinstance(s, int) and not isinstance(s, bool) else s for s in strides or [None]]
    if not isinstance(strides, list) or not all(
        isinstance(s, list) and len(s) == 3 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in s)
        for s in stages
    ):
        raise UsageError(f'{path}: "strides" must be a list of [x, y, z] positive integers (numbers, not references), '
                         f"got {strides!r}")  # fmt: skip
    return [math.prod(s[axis] for s in stages) for axis in range(3)]


def bundle_network_data_format(bundle: str | Path) -> dict[str, Any]:
    """The ``network_data_format`` of a bundle: its ``models/tasks.json`` and the strides and network class of its
    ``configs/inference.json``."""
    folder = find_bundle(bundle)
    path = folder / INFERENCE_CONFIG
    config = _read_json(path)
    network = config.get("network_def") if isinstance(config, dict) else None
    if not isinstance(network, dict) or not isinstance(network.get("_target_"), str):
        raise UsageError(f'{path}: "network_def" must be a component with a "_target_" class, got {network!r}')
    total = _total_stride(config.get("strides"), path)
    return network_data_format(load_model_tasks(folder / "models"), total, network["_target_"].endswith(".UniSeg"))


def json_text(data: Any) -> str:
    """JSON as the bundle files write it: 4-space indent, short lists of numbers or strings on one line."""
    text = json.dumps(data, indent=4)

    def join(match: re.Match) -> str:
        items = [item.strip() for item in match.group(2).split(",")]
        line = "[" + ", ".join(items) + "]"
        return match.group(1) + line if len(match.group(1)) + len(line) <= 100 else match.group(0)

    scalar = r'(?:-?[\d.eE+-]+|"[^"\n]*"|true|false|null)'
    return re.sub(rf"(^[^\n]*?)\[\s*({scalar}(?:,\s*{scalar})*)\s*\]", join, text, flags=re.M) + "\n"


def sync_metadata(bundle: str | Path, check: bool = False) -> tuple[Path, bool]:
    """Write the generated ``network_data_format`` into the bundle's ``configs/metadata.json`` (other fields kept);
    with ``check`` only compare. Returns the file and whether it differed."""
    path = find_bundle(bundle) / METADATA
    meta = _read_json(path)
    if not isinstance(meta, dict):
        raise UsageError(f"{path}: bundle metadata must be a JSON object, got {type(meta).__name__}")
    generated = bundle_network_data_format(bundle)
    differs = meta.get("network_data_format") != generated
    if differs and not check:
        if not path.stat().st_mode & 0o222:
            raise UsageError(f"{path} is read-only: make it writable to update it, or compare with --check")
        meta["network_data_format"] = generated
        write_text_atomic(path, json_text(meta))
    return path, differs
