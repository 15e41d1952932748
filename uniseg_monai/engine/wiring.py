"""Run wiring: which tasks a bundle run knows, which items it reads and under which task, for the bundle configs.

Every function here is called from a bundle config as a component (``{"_target_": "uniseg_monai.engine.wiring.<name>",
...}``), so the configs hold wiring and values, no logic. MONAI Label's special cases live here and nowhere else:
a MONAI Label request sets ``displayable_configs#task`` to the chosen task name (the bundle files hold the
drop-down list there), hands the items over itself (``train#dataset#data``, without ``"task"``) and trains in place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from uniseg_monai.core.errors import UsageError, flag
from uniseg_monai.core.locks import claimed
from uniseg_monai.core.run_folder import check_output_dir, check_predictions_dir, check_run_dir
from uniseg_monai.data.check import check_run_items
from uniseg_monai.data.datalist import SECTIONS, DatalistError, load_items, read_datalist, task_items
from uniseg_monai.data.memory import GIB, available_memory
from uniseg_monai.engine.precision import autocast_kwargs
from uniseg_monai.model_io.model_files import MODEL_FILE, model_tasks
from uniseg_monai.tasks import (
    MODEL_TASKS_FILE,
    TaskError,
    TaskRegistry,
    check_task_name,
    resolve_task,
    save_model_tasks,
)


def registry_for_datalist(path: str | Path) -> TaskRegistry:
    """Built-in tasks extended by the datalist's ``"tasks"``, narrowed to the tasks the datalist uses."""
    datalist = read_datalist(path)
    try:
        full = TaskRegistry().extended(datalist.get("tasks", {}))
    except TaskError as err:
        raise TaskError(f"{path}: {err}") from None
    used = [item["task"] for section in SECTIONS for item in datalist.get(section, [])]
    return full.subset(used or list(datalist.get("tasks", {})))


def registry_for_run(
    datalist: str | Path, ckpt_dir: str | Path, task: str = "", normalization: Sequence[Any] | None = None
) -> TaskRegistry:
    """The tasks of a training or evaluation run: the datalist's when the file exists, else (MONAI Label hands
    the items over without a datalist) the tasks of the model in ``ckpt_dir`` (its ``model.pt``'s table, else
    ``tasks.json``), else the built-in tasks.

    ``task`` (a fine-tuning bundle's one task): only that task, its ``normalization`` replaced when given.
    """
    if task:
        check_task_name(task, "bundle id task (--task)")
    if Path(datalist).is_file():
        registry = registry_for_datalist(datalist)
    elif any((Path(ckpt_dir) / name).is_file() for name in (MODEL_FILE, MODEL_TASKS_FILE)):
        registry = model_tasks(ckpt_dir)
    else:
        registry = TaskRegistry()
    if not task:
        return registry
    if task not in registry:
        source = f"{datalist}" if Path(datalist).is_file() else f"the model in {ckpt_dir} (no datalist {datalist})"
        raise UsageError(
            f"{source} has no task {task!r}, the task this bundle fine-tunes (--task; it has {registry.names}): define "
            f'{task!r} in the datalist\'s "tasks" table, or set --task to one of its tasks'
        )
    if normalization is not None:
        registry = registry.extended({task: {"normalization": list(normalization)}})
    return registry.subset([task])


def registry_for_evaluation(datalist: str | Path, ckpt_dir: str | Path) -> TaskRegistry:
    """The tasks an evaluation run scores: the model's in ``ckpt_dir``
    (:func:`~uniseg_monai.model_io.model_files.model_tasks`) with the datalist's definitions of them applied when the
    file exists (:meth:`TaskRegistry.with_definitions`: its ``label_map`` and class names win, as in training; other
    ids, channel or class counts, spacing or normalisation than the model's are refused)."""
    registry = model_tasks(ckpt_dir)
    if not Path(datalist).is_file():
        return registry
    return registry.with_definitions(read_datalist(datalist).get("tasks", {}), str(datalist))


def requested_task(choice: str | list[str]) -> str:
    """The task a MONAI Label request chose: ``displayable_configs#task`` holds the drop-down (a list of names)
    in the bundle files and the chosen name (a string) once a request set it; ``""`` when none was chosen. A chosen
    name must be a task name (:func:`~uniseg_monai.tasks.check_task_name`)."""
    if not isinstance(choice, str) or not choice:
        return ""
    return check_task_name(choice, "MONAI Label request: task")


def default_task(task: str, request_task: str = "") -> str:
    """The task of items that name none: the MONAI Label request's, else the bundle's ``task`` (may be ``""``:
    then only a one-task registry can decide, see :func:`uniseg_monai.tasks.resolve_task`)."""
    return request_task or task


def bundle_items(
    datalist: str | Path, section: str, registry: TaskRegistry, task: str = "", request_task: str = ""
) -> list[dict[str, Any]]:
    """The items a training or evaluation run reads from ``section`` of the datalist: those of ``task`` when the
    bundle names one (a training section without any is an error), else all; none for a MONAI Label request
    (it supplies the items)."""
    if request_task:
        return []
    if task:
        return task_items(datalist, section, registry, task)
    items = load_items(datalist, section, registry)
    if section == "training" and not items:
        raise DatalistError(
            f"{datalist}: no training cases (the 'training' section is missing or empty): add cases, or point "
            "--dataset_dir to the folder of the datalist you meant"
        )
    return items


def item_task_ids(items: Sequence[Mapping[str, Any]], registry: TaskRegistry, default: str = "") -> list[int]:
    """The network task id of every item (its own task, else ``default``): the task-uniform sampler's input."""
    return [resolve_task(item, registry, default).id for item in items]


def task_id(registry: TaskRegistry, task: str = "") -> int | None:
    """The network task id of ``task``; None when no task is set (then each item's own task decides)."""
    return registry[task].id if task else None


def _whole(value: Any, least: int = 1) -> bool:
    """Whether ``value`` is a whole number >= ``least`` (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _number(value: Any) -> bool:
    """Whether ``value`` is a finite int or float (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# id: (test, what the id takes) of the plain numbers a run checks in ``initialize``
NUMBER_RULES: dict[str, tuple[Any, str]] = {
    **{name: (_whole, "takes a positive integer") for name in
       ("epochs", "val_interval", "iterations_per_epoch", "batch_size", "sw_batch_size")},
    "num_workers": (lambda v: _whole(v, 0), "takes an integer >= 0 (0: load in the main process)"),
    "learning_rate": (lambda v: _number(v) and v > 0, "must be a number > 0"),
    "weight_decay": (lambda v: _number(v) and v >= 0, "must be a number >= 0"),
    "foreground_fraction": (lambda v: _number(v) and 0 <= v <= 1, "must be a number in [0, 1]"),
}  # fmt: skip


def check_numbers(patch_size: Any = (1, 1, 1), strides: Sequence[Sequence[int]] = (), **numbers: Any) -> bool:
    """Refuse, in one line naming the id, a run number that cannot work: each of ``numbers`` (ids of
    :data:`NUMBER_RULES`: epochs, batch size, learning rate, ...) as its rule says, ``patch_size`` three whole
    numbers >= 1, multiples of the network's total stride (the product of ``strides``, (levels, 3)). True, for
    ``initialize``."""
    for name, value in numbers.items():
        test, takes = NUMBER_RULES[name]
        if not test(value):
            raise UsageError(f"--{name} {takes}, got {value!r}")
    check_patch_size(patch_size, [math.prod(s[axis] for s in strides) for axis in range(3)] if strides else [1, 1, 1])
    return True


def check_patch_size(patch_size: Any, total: Sequence[int]) -> None:
    """Refuse, in one line, a ``--patch_size`` that is not three whole numbers >= 1, multiples of the network's total
    stride ``total`` (x, y, z): the line suggests the next multiples (training and ``uniseg predict``)."""
    if not (isinstance(patch_size, list | tuple) and len(patch_size) == 3 and all(map(_whole, patch_size))):
        raise UsageError(f"--patch_size must be [x, y, z] positive integers, got {patch_size!r}")
    total = [int(t) for t in total]
    if any(p % t for p, t in zip(patch_size, total)):
        fit = [-(-p // t) * t for p, t in zip(patch_size, total)]
        raise UsageError(
            f"--patch_size {list(patch_size)} is not divisible by the network's total stride {total}: set "
            f"--patch_size to multiples of it, e.g. {fit}"
        )


def check_validation(
    epochs: int,
    val_interval: int,
    required: bool = True,
    features: Sequence[int] = (),
    device: Any = "cpu",
    **numbers: Any,
) -> bool:
    """Refuse a training number that cannot work (:func:`check_numbers`, ``numbers``: its other arguments), a batch
    that cannot fit (:func:`check_batch_memory`, given the network's ``features`` and the training ``device``), then a
    run in which no validation runs (``val_interval`` > ``epochs``): none would pick and write ``model.pt``
    (``required`` false: the run writes it otherwise, as adding a task does). True, for ``initialize`` (before
    anything is written or any data cached)."""
    check_numbers(epochs=epochs, val_interval=val_interval, **numbers)
    if features:
        check_batch_memory(numbers["batch_size"], numbers["patch_size"], features, device)
    if flag(required, "validation_required") and val_interval > epochs:
        raise UsageError(
            f"--val_interval {val_interval} is more than --epochs {epochs}: no validation would run and no model.pt "
            "would be written; lower --val_interval or raise --epochs"
        )
    return True


def check_batch_memory(batch_size: int, patch_size: Sequence[int], features: Sequence[int], device: Any) -> bool:
    """Refuse a batch that cannot fit: per voxel of the batch's patches at least 16 bytes of host memory (image and
    label in float32, the samples and their collated batch) and 2 bytes x ``features[0]`` on the training device
    (the first layer's output), lower bounds of any training step, above the host's available memory
    (:func:`~uniseg_monai.data.memory.available_memory`) or a GPU's total. Such a batch would otherwise load its
    samples for hours before running out of memory. True, for ``initialize``."""
    voxels, device = batch_size * math.prod(patch_size), torch.device(device)
    host, layer = 16 * voxels, 2 * features[0] * voxels
    needs = [(host + layer * (device.type != "cuda"), available_memory(), "host memory")]
    if device.type == "cuda":
        needs.append((layer, torch.cuda.get_device_properties(device).total_memory, f"memory of {device}"))
    for need, has, what in needs:
        if has and need > has:
            raise UsageError(
                f"--batch_size {batch_size} with --patch_size {list(patch_size)}: one batch needs at least "
                f"{need / GIB:.1f} GiB of {what}, more than the {has / GIB:.1f} GiB available; lower --batch_size "
                "(cases are drawn with replacement: any batch size that fits works)"
            )
    return True


def start_run(
    ckpt_dir: str | Path,
    resume: bool,
    registry: TaskRegistry,
    request_task: str = "",
    items: Sequence[Sequence[Mapping[str, Any]]] = (),
    default: str = "",
    amp_dtype: str = "bfloat16",
) -> bool:
    """Before a training run: refuse an unknown ``amp_dtype``, own ``ckpt_dir`` for the run
    (:func:`uniseg_monai.core.locks.claimed`, released by the bundle's ``run`` list or when the process ends), refuse
    to overwrite an earlier run (:func:`uniseg_monai.core.run_folder.check_run_dir`; a MONAI Label request trains in
    place), check the headers of the files of ``items`` (lists of items, e.g. training and validation;
    :func:`uniseg_monai.data.check.check_run_items`, ``default``: the task of items that name none), then record the
    run's tasks in ``<ckpt_dir>/tasks.json``. A refusal releases the folder. True, for ``initialize`` (before any data
    is cached)."""
    resume = flag(resume, "resume")
    autocast_kwargs(amp_dtype)
    with claimed(ckpt_dir, "training"):
        check_run_dir(ckpt_dir, resume, in_place=bool(request_task))
        check_run_items(items, registry, default)
        save_model_tasks(registry, ckpt_dir)
    return True


def start_evaluation(
    output_dir: str | Path,
    overwrite: bool,
    items: Sequence[Mapping[str, Any]],
    registry: TaskRegistry,
    default: str = "",
) -> bool:
    """Before an evaluation run: own ``output_dir`` (:func:`uniseg_monai.core.locks.claimed`, released by the bundle's
    ``run`` list or when the process ends), refuse to replace an earlier report in it unless ``overwrite``
    (:func:`uniseg_monai.core.run_folder.check_output_dir`) and check the headers of the files of ``items``. A refusal
    releases the folder. True, for ``initialize``."""
    overwrite = flag(overwrite, "overwrite")
    unlabelled = [item for item in items if not item.get("label")]
    if unlabelled:
        raise UsageError(
            f"{len(unlabelled)} of the {len(items)} cases to evaluate have no 'label' (first: "
            f"{unlabelled[0].get('image')}): evaluation scores predictions against labels; evaluate a section whose "
            "cases have labels (--evaluate_section), or segment these with the inference config or `uniseg predict`"
        )
    with claimed(output_dir, "evaluation"):
        check_output_dir(output_dir, overwrite)
        check_run_items([items], registry, default)
    return True


def start_inference(
    output_dir: str | Path,
    overwrite: bool,
    items: Sequence[Mapping[str, Any]],
    datalist: str | Path,
    dataset_dir: str | Path,
    section: str = "testing",
    save_predictions: bool = True,
    registry: TaskRegistry | None = None,
    task: str = "",
) -> bool:
    """Before a bundle inference run (first in its ``run`` list: model-zoo CI initialises the workflow without
    data): refuse to run with no ``items`` (naming ``--dataset_dir`` or the datalist's ``section``); with the model's
    ``registry``, check the image headers of ``items`` (:func:`uniseg_monai.data.check.check_run_items`, no labels
    needed; ``task``: the task of items that name none), so an image whose channel count is not the task's
    modalities is refused before anything runs or is written; when it saves
    predictions, own ``output_dir`` (:func:`uniseg_monai.core.locks.claimed`, released by the ``run`` list or when the
    process ends) and refuse earlier predictions in it unless ``overwrite``
    (:func:`uniseg_monai.core.run_folder.check_predictions_dir`). True, for the ``run`` list."""
    overwrite = flag(overwrite, "overwrite")
    if not items:
        if Path(datalist).is_file():
            raise UsageError(f"{datalist}: no {section!r} cases to segment: add them, or set --inference_section")
        where = "does not exist" if not Path(dataset_dir).is_dir() else "holds no datalist.json and no *.nii.gz"
        raise UsageError(
            f"--dataset_dir {dataset_dir} {where}: nothing to segment; point it to a folder with a datalist.json or "
            "*.nii.gz images (directly or in imagesTs/)"
        )
    if registry is not None:
        check_run_items([items], registry, task, labelled=False)
    if not flag(save_predictions, "save_predictions"):
        return True
    with claimed(output_dir, "inference"):
        check_predictions_dir(output_dir, overwrite)
    return True


# handler types that write logs, progress or files: one rank of a multi-GPU run does that
RANK_ZERO_ONLY = (
    "StatsHandler", "TensorBoardStatsHandler", "ProgressBar", "CheckpointSaver", "EvaluationReport", "ReportWriter"
)  # fmt: skip


def rank_handlers(handlers: Sequence[Any], rank: int) -> list[Any]:
    """The handlers of one rank of a multi-GPU run: all on rank 0; on the others those that neither log nor
    write (selected by type, so the order of the list does not matter)."""
    if rank == 0:
        return list(handlers)
    return [h for h in handlers if not any(c.__name__ in RANK_ZERO_ONLY for c in type(h).__mro__)]


def task_names(registry: TaskRegistry, task: str = "") -> list[str]:
    """The MONAI Label drop-down (``displayable_configs#task``): the bundle's ``task`` alone when set, else every
    task of the registry in id order."""
    return [registry[task].name] if task else registry.names
