"""Add a task to a trained UniSeg without changing what it does for its tasks (``uniseg add-task``, the pretrain
bundle's ``configs/add_task.json``).

UniSeg's task count N lives only in the universal prompt (U = N channels), FUSE (input F + U, output N) and the heads
(max classes over tasks). :func:`grow_network` makes room for task N (``UniSeg(added_tasks=..., class_groups=...)``):

- universal prompt: one more channel, initialised as the others (standard normal; a fixed prompt: zeros).
- FUSE: the trained blocks stay as they are and read the old prompt channels only (as zero weights for the new
  channel would); the new task's prompt is a new filter (a conv block, He-initialised) over the input of FUSE's last
  block plus the new prompt channel. Multiple Prompts: the new prompt channel is the new task's prompt.
- heads: one new output channel per class the new task has beyond the heads' count (old tasks never read them).

Every old tensor is used with its old shape, in its own convolution, so old tasks compute the same numbers bit for
bit on any machine (appending zero weights or output rows to one convolution does not: kernels pick other
blocking, and the numbers differ by rounding). What trains (``mode``; the rest has
``requires_grad=False``):

- ``prompt``: only parts no old task reads: the new FUSE filter, the new prompt channel and new head rows. The
  decoder is shared and frozen, so the new task must be expressible through its one prompt channel; old tasks stay
  bit-identical after training.
- ``decoder``: also the whole decoder and heads (old tasks change: the run reports by how much).
- ``full``: everything.

In ``prompt`` and ``decoder`` mode the old part of a partly new tensor (universal prompt, heads) is put back after
every optimiser step (weight decay and momentum move it even with a zero gradient), and its gradient is zeroed so
that gradient clipping sees only what trains.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser

from uniseg_monai.apps.bundles import find_bundle, run_workflow
from uniseg_monai.core.atomic import inside, write_group, write_text_atomic
from uniseg_monai.core.errors import UsageError, flag
from uniseg_monai.data.datalist import load_items, read_datalist
from uniseg_monai.model_io.model_files import (
    MODEL_FILE,
    ModelFile,
    build_network,
    network_from_file,
    read_model,
    save_model,
    sha256,
)
from uniseg_monai.networks import UniSeg
from uniseg_monai.tasks import MODEL_TASKS_FILE, TaskError, TaskRegistry, check_task_name

logger = logging.getLogger(__name__)

MODES = ("prompt", "decoder", "full")
TRAINED_WHOLE = {"prompt": (), "decoder": ("decoder.", "heads."), "full": ("",)}  # key prefixes, per mode
REPORT_FILE = "add_task.json"
OWN_IDS = {  # bundle ids uniseg add-task sets itself (or that would contradict the base model): what to use instead
    **{k: "set by uniseg add-task (--out, --datalist, --checkpoint, --task, --mode, --rehearse)" for k in
       ("ckpt_dir", "dataset_dir", "datalist", "base_model", "add_task", "add_mode", "add_rehearse", "bundle_root")},
    **{k: "the network is the base model's, grown; it cannot change" for k in
       ("network_def", "patch_size", "features", "base_features", "kernel_sizes", "strides", "registry")},
}  # fmt: skip


def grow_network(base: UniSeg, num_classes: int) -> UniSeg:
    """``base`` with one more task (id ``base.num_tasks``, one of ``added_tasks``) and at least ``num_classes``
    outputs (a new class group): its tensors copied, the universal prompt and the heads with new channels / rows
    from the new network's own initialisation, as the new task's FUSE filter."""
    network_def = {**base.network_def(), "num_tasks": base.num_tasks + 1}
    network_def["added_tasks"] = network_def.get("added_tasks", 0) + 1
    if num_classes > base.num_classes:
        network_def["num_classes"] = num_classes
        network_def["class_groups"] = [*base.class_groups, num_classes - base.num_classes]
    grown = build_network(network_def)
    grown.deep_supervision = base.deep_supervision
    state = grown.state_dict()
    for key, value in base.state_dict().items():
        state[key][tuple(slice(0, n) for n in value.shape)] = value
    grown.load_state_dict(state)
    return grown


def old_region(key: str, old_shape: Sequence[int] | None, new: torch.Tensor) -> tuple[slice, ...] | None:
    """What old tasks read of the grown tensor ``new``: nothing of a new tensor (None), the universal prompt's old
    channels, the heads' old rows, all of any other tensor."""
    if old_shape is None:
        return None
    if key == "universal_prompt":
        return (slice(None), slice(0, old_shape[1]))
    return (slice(0, old_shape[0]),) if new.ndim else ()


def added_task_registry(model: ModelFile, datalist: str | os.PathLike, task: str) -> TaskRegistry:
    """The tasks of ``model`` plus ``task`` (as the datalist's ``"tasks"`` or the built-in tasks define it) with the
    model's next free slot as its id. UsageError for a task the model has, an undefined one, one without a modality
    stem in the model and a datalist without training cases of it."""
    if model.tasks is None:
        raise UsageError(f"{model.path}: the model carries no task table (tasks.json), so no task can be added to it")
    if not task:
        raise UsageError('name the task to add: --task NAME, defined in the datalist\'s "tasks"')
    check_task_name(task, "--task (bundle id add_task)")
    if task in model.tasks:
        raise UsageError(
            f"{task!r} is already task {model.tasks[task].id} of {model.path} (tasks: {', '.join(model.tasks.names)});"
            ' give the new task another name in the datalist\'s "tasks", or fine-tune the bundle to retrain it'
        )
    data = read_datalist(datalist)
    spec = dict(data.get("tasks", {}).get(task, {}))
    builtin = TaskRegistry()
    if not spec and task not in builtin:
        raise UsageError(
            f'{datalist}: task {task!r} is not defined: add it to the datalist\'s "tasks" (modalities, labels, '
            "spacing, normalization; README 'Datalist format')"
        )
    slot = int(model.network_def["num_tasks"])
    if spec.get("id", slot) != slot:
        logger.info("%s: the datalist gives %r id %s; the added task takes the model's next slot, %d",
                    datalist, task, spec["id"], slot)  # fmt: skip
    new = builtin.extended({task: {**spec, "id": slot}})[task]
    stems = list(model.network_def["in_channels"])
    if new.in_channels not in stems:
        raise UsageError(
            f"task {task!r} has {new.in_channels} channels ({'+'.join(new.modalities)}) but {model.path} has modality "
            f"stems for {stems} channels only: a new stem would be an untrained first layer; give the task one of "
            "those channel counts"
        )
    if not any(item["task"] == task for item in data.get("training", [])):
        raise UsageError(f'{datalist}: no training cases of task {task!r}: add them to its "training" section')
    return TaskRegistry([*model.tasks.values(), new])


def old_task_change(network: UniSeg, base: UniSeg, tasks: TaskRegistry, size: Sequence[int]) -> dict[str, float]:
    """Max |logit difference| between ``network`` and ``base`` for each task of ``tasks`` (its classes only), at full
    resolution on one seeded standard-normal probe (1, C_t, *size) per task, in eval mode."""
    generator = torch.Generator().manual_seed(0)
    device = next(network.parameters()).device
    modes = network.training, base.training
    network.eval(), base.to(device).eval()
    change = {}
    with torch.no_grad():
        for task in sorted(tasks.values(), key=lambda t: t.id):
            x = torch.randn(1, task.in_channels, *size, generator=generator).to(device)
            ids = torch.tensor([task.id], device=device)
            a, b = network(x, ids)[:, : task.num_classes], base(x, ids)[:, : task.num_classes]
            change[task.name] = float((a - b).abs().max())
    network.train(modes[0]), base.train(modes[1])
    return change


def _warn_about(
    data: dict,
    datalist: str | os.PathLike,
    registry: TaskRegistry,
    task: str,
    mode: str,
    rehearsed: list,
    rehearse: bool,
) -> None:
    """Log what an add-task run will do that the user may not expect: no validation cases of the new task, nothing
    to rehearse in decoder / full mode, old tasks the datalist defines otherwise than the model (the model's wins)."""
    if not any(item["task"] == task for item in data.get("validation", [])):
        logger.warning("%s: no validation cases of %r: the best model is not chosen by its Dice", datalist, task)
    if mode != "prompt" and rehearse and not rehearsed:
        logger.warning(
            "%s holds no cases of the model's old tasks: %s mode will change them unchecked (add their cases to "
            "rehearse them, or use --mode prompt)", datalist, mode,
        )  # fmt: skip
    for name, spec in data.get("tasks", {}).items():
        if name != task and name in registry and isinstance(spec, dict):
            ours = _normal(registry[name].to_json())
            try:  # as the datalist's tasks are read (a list or a tuple, 3 or 3.0, a short form: the same value)
                theirs = _normal(registry.extended({name: spec})[name].to_json())
            except (TaskError, ValueError, TypeError):
                theirs = _normal(spec)
            differ = sorted(k for k in spec if k != "id" and k in ours and theirs.get(k) != ours[k])
            if differ:
                logger.warning("%s: task %r differs from the model's in %s; the model's definition is used",
                               datalist, name, differ)  # fmt: skip


def _normal(value: Any) -> Any:
    """``value`` as JSON reads it back (tuples become lists, keys strings): values compared, not their types."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


class TaskExtension:
    """An add-task run's network, task table and patch size, built from the base model file; attached to the trainer
    (in ``train#handlers``) it keeps the old rows fixed and, when training ends, writes ``<ckpt_dir>/add_task.json``
    with how much every old task's output changed (``model.pt``'s, else the final weights').

    Args:
        base_model: a trained UniSeg model file (``models/model.pt`` or a checkpoint); only read.
        datalist: datalist defining ``task`` (its ``"tasks"``) with training cases of it.
        task: the name of the task to add.
        mode: ``"prompt"``, ``"decoder"`` or ``"full"`` (module docstring).
        ckpt_dir: the new model's folder; not the base model's.
        rehearse: in ``decoder`` and ``full`` mode also train and validate on the datalist's cases of the model's
            old tasks (task-uniform sampling, the best model by the mean Dice over all of them), which limits how much
            the old tasks change; ``prompt`` mode trains on the new task only (old tasks' cases cannot change what
            it trains).

    Attributes:
        registry: the N + 1 tasks; ``network``: the grown UniSeg; ``patch_size``: the base model's (x, y, z);
        ``trained_tasks``: the tasks whose cases the run reads (:meth:`items`).
    """

    def __init__(
        self,
        base_model: str | os.PathLike,
        datalist: str | os.PathLike,
        task: str,
        mode: str,
        ckpt_dir: str,
        rehearse: bool = True,
    ) -> None:
        if mode not in MODES:
            raise UsageError(f"--mode (bundle id add_mode) must be one of {list(MODES)}, got {mode!r}")
        path = Path(base_model)
        if path.resolve().parent == Path(ckpt_dir).resolve():
            raise UsageError(
                f"{ckpt_dir} holds the base model {path.name}: the new model goes to another folder (--out; bundle id "
                "ckpt_dir); the base model is never replaced"
            )
        model = read_model(path)
        if (model.network_def or {}).get("_target_") != "uniseg_monai.networks.UniSeg":
            target = (model.network_def or {}).get("_target_", "an unknown network")
            raise UsageError(
                f"{path}: tasks can be added to a UniSeg model with its network_def only (a pretrain bundle's model.pt "
                f"or checkpoint, a converted official upstream model); this one is {target}"
            )
        self.registry = added_task_registry(model, datalist, task)
        base = build_network(model.network_def)
        base.load_state_dict(model.state)
        self.base, self.old_tasks, self.task, self.mode = base, model.tasks, task, mode
        self.ckpt_dir, self.datalist = Path(ckpt_dir), datalist
        data = read_datalist(datalist)
        cases = {item["task"] for item in data.get("training", [])}
        rehearse = flag(rehearse, "rehearse")
        rehearsed = [name for name in model.tasks.names if name in cases] if rehearse else []
        self.trained_tasks = [task] + (rehearsed if mode != "prompt" else [])
        _warn_about(data, datalist, self.registry, task, mode, rehearsed, rehearse)
        self.network = grow_network(base, self.registry[task].num_classes)
        self.patch_size = list(model.network_def["patch_size"])
        self.frozen: dict[str, tuple[tuple[slice, ...], torch.Tensor]] = {}  # partly trained: (old region, values)
        for key, param in self.network.named_parameters():
            if key.startswith(TRAINED_WHOLE[mode]):
                continue
            region = old_region(key, model.state[key].shape if key in model.state else None, param)
            if region is None:
                continue
            if param[region].numel() == param.numel():
                param.requires_grad_(False)
            else:
                self.frozen[key] = (region, param.detach()[region].clone())
        earlier, digest = (model.provenance or {}).get("added_tasks", []), sha256(path)
        self.network.pretrained_provenance = {
            **(model.provenance or {}),
            "base_model": str(path.resolve()),
            "base_model_sha256": digest,
            "added_tasks": [*earlier, {"task": task, "mode": mode, "base_model_sha256": digest}],
        }

    def items(self, section: str) -> list[dict[str, Any]]:
        """The datalist's items of :attr:`trained_tasks` in ``section`` (absolute paths)."""
        return load_items(self.datalist, section, self.registry, only=self.trained_tasks)

    def trainable_parameters(self) -> int:
        """Numbers the optimiser may change: whole trained tensors plus the new parts of partly trained ones."""
        total = 0
        for key, param in self.network.named_parameters():
            if param.requires_grad:
                total += param.numel() - (param[self.frozen[key][0]].numel() if key in self.frozen else 0)
        return total

    def attach(self, engine: Engine) -> None:
        params = dict(self.network.named_parameters())
        for key, (region, value) in self.frozen.items():
            keep = torch.ones_like(params[key], dtype=torch.bool)
            keep[region] = False
            params[key].register_hook(lambda grad, keep=keep: grad * keep)
            self.frozen[key] = (region, value.to(params[key].device))
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.restore)
        engine.add_event_handler(Events.COMPLETED, self.report)
        logger.info(
            "adding task %r (id %d) in %s mode: %s of %s parameters train",
            self.task, self.registry[self.task].id, self.mode, f"{self.trainable_parameters():,}",
            f"{sum(p.numel() for p in self.network.parameters()):,}",
        )  # fmt: skip

    def restore(self, engine: Engine | None = None) -> None:
        """Put the old rows back (after each optimiser step)."""
        params = dict(self.network.named_parameters())
        with torch.no_grad():
            for key, (region, value) in self.frozen.items():
                params[key][region] = value

    def report(self, engine: Engine | None = None) -> dict[str, Any]:
        """Write and log ``add_task.json``: the tasks, the mode, the trainable parameters and the old tasks' change."""
        saved = self.ckpt_dir / MODEL_FILE
        if not saved.is_file():  # no validation ran (no validation cases, or --val_interval above --epochs)
            logger.warning("no validation chose a best model: %s holds the final weights", saved)
            provenance = self.network.pretrained_provenance
            save_model(saved, self.network.state_dict(), self.network.network_def(), self.registry, provenance)
        network = network_from_file(saved)[0].to(next(self.network.parameters()).device)
        result = {
            "base_model": self.network.pretrained_provenance["base_model"],
            "model": str(saved),
            "task": self.task,
            "task_id": self.registry[self.task].id,
            "mode": self.mode,
            "trained_on": self.trained_tasks,
            "trainable_parameters": self.trainable_parameters(),
            "old_tasks_max_abs_logit_change": old_task_change(network, self.base, self.old_tasks, self.patch_size),
            "probe": f"one seeded standard-normal image of the patch size {self.patch_size} per old task, eval mode",
        }
        write_text_atomic(self.ckpt_dir / REPORT_FILE, json.dumps(result, indent=2) + "\n")
        logger.info("old tasks' max |logit change|: %s", result["old_tasks_max_abs_logit_change"])
        return result


def install(model_dir: str | os.PathLike, bundle_models: str | os.PathLike) -> list[Path]:
    """Make the model in ``model_dir`` the bundle's: ``bundle_models``/model.pt and tasks.json replaced together
    (:func:`~uniseg_monai.core.atomic.write_group`) after the current ones are copied to ``*_before_<UTC time>.*``
    beside them. Returns the backups."""
    missing = [str(Path(model_dir) / n) for n in (MODEL_FILE, MODEL_TASKS_FILE) if not (Path(model_dir) / n).is_file()]
    if missing:
        raise UsageError(f"nothing installed: {', '.join(missing)} missing")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    folder, kept = Path(bundle_models), []
    for name in (MODEL_FILE, MODEL_TASKS_FILE):
        current = folder / name
        if current.is_file():
            kept.append(current.with_name(f"{current.stem}_before_{stamp}{current.suffix}"))
            shutil.copy2(current, kept[-1])
    sources = {folder / name: Path(model_dir) / name for name in (MODEL_FILE, MODEL_TASKS_FILE)}
    write_group({dst: lambda f, src=src: f.write(src.read_bytes()) for dst, src in sources.items()})
    return kept


def add_task(
    datalist: str,
    task: str,
    bundle: str = "uniseg_pretrain",
    mode: str = "prompt",
    out: str = "",
    checkpoint: str = "",
    configs: Sequence[str] = (),
    install_model: bool = False,
    rehearse: bool = True,
    **ids: Any,
) -> dict[str, Any]:
    """Train ``task`` into the bundle's model (or ``checkpoint``) with the bundle's ``configs/train.json``, the
    ``configs`` overlays (e.g. ``demo``) and ``configs/add_task.json``; the new model goes to ``out`` (default
    ``<bundle>/models_<task>``), and with ``install_model`` also replaces the bundle's (backups kept); ``rehearse``: as
    :class:`TaskExtension`. ``ids``: other bundle ids (``epochs``, ``iterations_per_epoch``, ``learning_rate``,
    ...). Returns the run's report."""
    check_task_name(task, "--task")
    folder = find_bundle(bundle)
    if not (folder / "configs" / "add_task.json").is_file():
        raise UsageError(
            f"{folder} has no configs/add_task.json: tasks are added with a pretrain bundle (uniseg_pretrain)"
        )
    base = Path(checkpoint) if checkpoint else folder / "models" / MODEL_FILE
    if checkpoint and base.is_dir():
        raise UsageError(f"--checkpoint {base} is a folder: pass the model file, e.g. {base / MODEL_FILE}")
    if checkpoint and not base.exists():
        raise UsageError(f"--checkpoint {base}: file not found")
    if not base.is_file():
        raise UsageError(
            f"{base}: no trained model to add a task to: train the bundle, fetch weights (`uniseg weights --bundle "
            f"{bundle}`) or pass --checkpoint FILE"
        )
    if not Path(datalist).is_file():
        raise UsageError(f"--datalist {datalist}: not a file (the datalist JSON that defines {task!r})")
    taken = {k: OWN_IDS[k] for k in ids if k in OWN_IDS}
    if taken:
        raise UsageError("; ".join(f"--{k}: {why}" for k, why in taken.items()))
    for key in ("epochs", "iterations_per_epoch", "val_interval"):
        if key in ids and (isinstance(ids[key], bool) or not isinstance(ids[key], int) or ids[key] < 1):
            raise UsageError(f"--{key} must be a whole number >= 1, got {ids[key]!r}")
    files = [folder / "configs" / f"{name}.json" for name in ("train", *configs, "add_task")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UsageError(f"not found: {', '.join(missing)} (--configs names files of the bundle's configs/ folder)")
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    unknown = sorted(k for k in ids if k not in parser)
    if unknown:
        raise UsageError(f"unknown bundle setting(s) {unknown}: not ids of {', '.join(f.name for f in files)}")
    model_dir = Path(out or inside(folder, f"models_{task}")).resolve()
    settings = {"output_dir": str(model_dir / "logs"), **ids}
    run_workflow(
        folder,
        "train",
        ["train", *configs, "add_task"],
        dataset_dir=str(Path(datalist).resolve().parent),
        datalist=str(Path(datalist).resolve()),
        add_task=task,
        add_mode=mode,
        add_rehearse=rehearse,
        base_model=str(base.resolve()),
        ckpt_dir=str(model_dir),
        **settings,
    )
    result = json.loads((model_dir / REPORT_FILE).read_text())
    if install_model:
        result["installed"] = str(folder / "models" / MODEL_FILE)
        result["backups"] = [str(p) for p in install(model_dir, folder / "models")]
    return result
