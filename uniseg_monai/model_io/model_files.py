"""Model files: the one place that reads and writes the weights files this package meets.

A model file written by this package is a ``torch.save`` dict read back with ``torch.load(weights_only=True)``:

- ``model``: the state dict (our key names, (x, y, z) axes);
- ``network_def``: the MONAI bundle config that builds the network (``_target_`` + constructor arguments);
- ``tasks``: the model's task table (:meth:`TaskRegistry.to_json`: names, ids, labels, spacing, normalisation);
- training checkpoints add ``optimizer``, ``lr_scheduler`` and ``trainer`` (:mod:`uniseg_monai.engine.checkpoints`);
  converted files add ``provenance``.

Also read, so that files of earlier versions and of the official release keep working:

- a bare state dict or ``{"model": state_dict}``: the task table comes from the ``tasks.json`` beside the file;
- an official UniSeg (nnU-Net v1) container ``{"state_dict", "optimizer_state_dict", "plot_stuff", ...}`` with
  numpy scalars pickled by numpy 1.x or 2: converted on the fly (:mod:`uniseg_monai.model_io.official`); only the numpy
  globals in :data:`NUMPY_SAFE_GLOBALS` are allowed, anything else that would run code is refused unexecuted.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import pickle
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from uniseg_monai.core.atomic import write_atomic
from uniseg_monai.core.errors import UniSegError, UsageError
from uniseg_monai.model_io.official import OfficialCheckpointError, convert_state_dict, infer_network_def, strip_prefix
from uniseg_monai.networks import CLIPDoDNet, DoDNet, TaskBlindUniSeg, UniSeg, UniSegBackbone
from uniseg_monai.networks.uniseg import PROMPTS
from uniseg_monai.tasks import (
    MODEL_TASKS_FILE,
    PAPER_UPSTREAM_TASKS,
    TaskError,
    TaskRegistry,
    check_task_name,
    load_model_tasks,
    task_table,
)

logger = logging.getLogger(__name__)

_SCALAR = np._core.multiarray.scalar
# What an nnU-Net v1 checkpoint's plot_stuff / best_stuff need (np.mean of float32 losses and of float64 Dice
# values): scalar reconstruction under the numpy 1.x name the 2023 release uses and under numpy 2's, numpy.dtype,
# and the two dtype classes whose state the pickle sets. Nothing else.
NUMPY_SAFE_GLOBALS: list = [
    (_SCALAR, "numpy.core.multiarray.scalar"),
    (_SCALAR, "numpy._core.multiarray.scalar"),
    np.dtype,
    type(np.dtype(np.float64)),
    type(np.dtype(np.float32)),
]
MODEL_FILE = "model.pt"
NETWORK_CLASSES = {
    f"uniseg_monai.networks.{c.__name__}": c for c in (UniSeg, UniSegBackbone, DoDNet, CLIPDoDNet, TaskBlindUniSeg)
}
WORDS = {"prompt": PROMPTS, "prompt_at": ("start", "end")}  # the only string arguments a network_def may hold
OFFICIAL_LICENCE = (
    "UniSeg weights by Ye et al. (https://github.com/yeerwen/UniSeg), released for non-commercial use only; that "
    "licence applies to these weights and to files converted from them, whatever the licence of this code (Apache-2.0)"
)


class ModelFileError(UniSegError, ValueError):
    """A model file that cannot be read, or does not fit the network or bundle it is used with."""


@dataclass
class ModelFile:
    """A model file's content in this package's terms.

    Attributes:
        path: the file.
        state: state dict with our key names and (x, y, z) axes.
        network_def: bundle config of its network, or None (an older file: the bundle's config decides).
        tasks: its task table, or None when neither the file nor a ``tasks.json`` beside it has one.
        official: whether it was an official UniSeg checkpoint (converted while reading).
        provenance: where converted or fetched weights came from and their licence, if recorded.
    """

    path: Path
    state: dict[str, torch.Tensor]
    network_def: dict[str, Any] | None
    tasks: TaskRegistry | None
    official: bool
    provenance: dict[str, Any] | None = None


def load_weights_only(
    path: str | os.PathLike,
    error: type[Exception] = ModelFileError,
    name: str = "",
    fix: str = "download or save it again",
    map_location: Any = "cpu",
) -> Any:
    """``torch.load(path, weights_only=True)`` (on the CPU unless ``map_location``), allowing only
    :data:`NUMPY_SAFE_GLOBALS` besides torch's own; a file that needs anything else (code that would run) raises
    ``error`` (naming the file, or ``name``: e.g. the URL of a download) and nothing runs. A file that is not a
    PyTorch file raises ``error`` with ``fix``: what the user does about it."""
    path = Path(path)
    label = name or str(path)
    if path.is_dir():
        raise error(f"{label} is a folder; give the model file in it, e.g. {path / MODEL_FILE}")
    if not path.is_file():
        raise error(f"{label}: model file not found")
    try:
        with torch.serialization.safe_globals(NUMPY_SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        refused = _refused_globals(path)
        if refused is None:  # not even a PyTorch file
            raise error(f"{label}: not a readable PyTorch file; {fix}") from err
        raise error(
            f"{label}: refused to load: unpickling it would call {', '.join(refused) or 'objects'} (not plain weights; "
            "weights_only=True refused it). Re-save only its state_dict with torch.save, or get the file again."
        ) from err
    except (RuntimeError, EOFError, OSError, KeyError, IndexError, ValueError) as err:  # garbage bytes: any of them
        raise error(f"{label}: not a readable PyTorch file ({_unreadable(err)}); {fix}") from err


def _unreadable(err: Exception) -> str:
    """Why torch could not read a file, in words: pickle's KeyError / IndexError carry only a byte value."""
    if isinstance(err, EOFError):
        return "empty or truncated"
    if isinstance(err, (KeyError, IndexError)) or not str(err).strip():
        return "invalid data: neither a PyTorch zip archive nor a pickle"
    return str(err).strip().splitlines()[0]


def _refused_globals(path: Path) -> list[str] | None:
    """The globals of a checkpoint that weights-only loading refuses (read without unpickling), or None when the
    file cannot be inspected at all."""
    allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in NUMPY_SAFE_GLOBALS}
    try:
        return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
    except Exception:
        return None


def _state_of(obj: Any, path: Path | str) -> dict[str, torch.Tensor]:
    state = obj.get("model", obj.get("state_dict", obj)) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(
            f"{path}: not a model file: expected a state dict of tensors, bare, under 'model' (this package) or "
            "under 'state_dict' (official UniSeg .model)"
        )
    return state


def read_model(path: str | os.PathLike, name: str = "") -> ModelFile:
    """Read any accepted model file (see the module docstring) without running code; errors name the file, or
    ``name`` (what the user knows the file as, e.g. a URL)."""
    path = Path(path)
    label = name or str(path)
    obj = load_weights_only(path, name=label)
    state = _state_of(obj, label)
    state = strip_prefix(state)
    check_finite(state, label)
    network_def = obj.get("network_def") if isinstance(obj, dict) else None
    if network_def is not None:
        network_def = checked_network_def(network_def, label)
    tasks = obj.get("tasks") if isinstance(obj, dict) else None
    provenance = obj.get("provenance") if isinstance(obj, dict) else None
    official = any(k.startswith("conv_blocks_context.") for k in state)
    if official:
        provenance = provenance or {"source": str(path), "licence": OFFICIAL_LICENCE}
        try:
            network_def = infer_network_def(state)
            state = convert_state_dict(state)
        except OfficialCheckpointError as err:
            raise ModelFileError(f"{label}: {err}") from err
        if network_def.get("num_tasks") == len(PAPER_UPSTREAM_TASKS):
            tasks = TaskRegistry().subset(PAPER_UPSTREAM_TASKS).to_json()  # the release: the paper's 11 tasks
    if tasks is not None:
        try:
            registry = task_table(tasks, label)
        except TaskError as err:
            raise ModelFileError(str(err)) from None
    elif (path.parent / MODEL_TASKS_FILE).is_file():
        registry = load_model_tasks(path.parent)
    else:
        registry = None
    if network_def is not None and not official:
        check_weights_fit(state, network_def, label)
    if registry is not None and network_def is not None:
        check_tasks_fit(
            registry, network_def, label if tasks is not None else f"{label} with the {MODEL_TASKS_FILE} beside it"
        )
    return ModelFile(path, state, network_def, registry, official, provenance)


def check_finite(state: dict[str, torch.Tensor], label: str) -> None:
    """A :class:`ModelFileError` naming the file ``label`` and its first tensor holding NaN / Inf (training never
    writes one: :mod:`uniseg_monai.engine.checkpoints` refuses to save it), so that no converted, installed,
    exported or predicting model carries them."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise ModelFileError(
            f"{label}: {len(bad)} of {len(state)} weight tensors hold NaN / Inf (first: {bad[0]}): the weights are "
            "not usable (a diverged run or a damaged file); use the last good checkpoint or get the file again"
        )


def check_tasks_fit(tasks: TaskRegistry, network_def: dict[str, Any], label: str) -> None:
    """A :class:`ModelFileError` naming the file ``label`` if a task of its table has no slot in the network (an id
    >= ``num_tasks``) or more classes than its ``num_classes`` outputs; a one-task network (no ``num_tasks``: a
    :class:`UniSegBackbone`) takes exactly one task, with exactly ``num_classes`` labels."""
    slots, classes = network_def.get("num_tasks"), network_def.get("num_classes")
    inconsistent = "the task table and the network disagree: fix the task table (labels and tasks it was trained with)"
    if slots is None and len(tasks) != 1:
        raise ModelFileError(
            f"{label}: its task table has {len(tasks)} tasks ({', '.join(tasks.names)}), but the network is a "
            f"one-task network; {inconsistent}"
        )
    for task in tasks.values():
        if isinstance(slots, int) and task.id >= slots:
            raise ModelFileError(
                f"{label}: its task table gives task {task.name!r} id {task.id}, but the network has {slots} task "
                f"slot(s) (ids 0-{slots - 1}); the file is inconsistent: re-save it with its task ids"
            )
        if isinstance(classes, int) and (task.num_classes > classes or (slots is None and task.num_classes != classes)):
            raise ModelFileError(
                f"{label}: task {task.name!r} has {task.num_classes} labels, but the network outputs {classes} "
                f"classes; {inconsistent}"
            )


MAX_SIZE = 4096  # the largest number a network_def may hold: channels, classes, tasks, window sizes
MAX_STAGES = 12
ZERO_ALLOWED = ("added_tasks", "prompt_channels")  # the numbers that may be 0; every other one is >= 1


def checked_network_def(network_def: Any, label: str) -> dict[str, Any]:
    """A model file's ``network_def`` if it names one of :data:`NETWORK_CLASSES` with whole numbers in
    [1, :data:`MAX_SIZE`] (or lists of them, one per stage for ``features``, ``kernel_sizes``, ``strides``) as
    arguments; anything else (e.g. MONAI config code such as ``$`` expressions) is refused unevaluated, naming the
    field."""
    target = network_def.get("_target_") if isinstance(network_def, dict) else None
    if target not in NETWORK_CLASSES or not all(
        _plain(k, v) for k, v in network_def.items() if k != "_target_"
    ):  # fmt: skip
        raise ModelFileError(
            f"{label}: its network_def is not a UniSeg network with plain numeric arguments (refused unevaluated): "
            f"{str(network_def)[:200]}"
        )
    for key, value in network_def.items():
        if why := _bad_field(key, value, network_def):
            raise ModelFileError(
                f"{label}: network_def field {key!r} {why}, got {str(value)[:80]}: the file is damaged or was "
                "edited; get or save it again"
            )
    return network_def


def _plain(key: str, value: Any) -> bool:
    if isinstance(value, list):
        return all(_plain(key, v) for v in value)
    if isinstance(value, str):
        return value in WORDS.get(key, ())
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bad_field(key: str, value: Any, network_def: dict[str, Any]) -> str:
    """Why the value of ``network_def[key]`` is not a sane constructor argument, or ''."""
    if key == "_target_" or isinstance(value, str):
        return ""
    low = 0 if key in ZERO_ALLOWED else 1
    numbers = [
        v
        for item in (value if isinstance(value, list) else [value])
        for v in (item if isinstance(item, list) else [item])
    ]
    if not all(isinstance(v, int) and low <= v <= MAX_SIZE for v in numbers):
        return f"must hold whole numbers from {low} to {MAX_SIZE}"
    stages = network_def.get("features")
    if key == "features" and not 2 <= len(value) <= MAX_STAGES:
        return f"must be a list of 2 to {MAX_STAGES} stage widths"
    if key in ("kernel_sizes", "strides") and (
        not isinstance(value, list) or not isinstance(stages, list) or len(value) != len(stages)
    ):
        return "must be a list with one entry per stage of features"
    if key in ("kernel_sizes", "strides", "patch_size"):
        entries = value if key != "patch_size" else [value]
        if any(isinstance(e, list) and len(e) != 3 for e in entries):
            return "must give 3 sizes (x, y, z)"
    return ""


def _network_on_meta(network_def: dict[str, Any], label: str) -> torch.nn.Module:
    """The network ``network_def`` describes, built on the meta device (shapes only, no memory)."""
    try:
        with torch.device("meta"):
            return build_network(network_def)
    except (UniSegError, ValueError, TypeError, RuntimeError) as err:
        reason = " ".join(str(err).split())[:200]
        raise ModelFileError(f"{label}: its network_def does not describe a buildable network ({reason})") from None


def check_weights_fit(state: dict[str, torch.Tensor], network_def: dict[str, Any], label: str) -> None:
    """A :class:`ModelFileError` naming the file ``label`` if its tensors are not those of the network its own
    ``network_def`` describes (compared on the meta device: nothing is allocated)."""
    expected = {k: tuple(v.shape) for k, v in _network_on_meta(network_def, label).state_dict().items()}
    if differences := tensor_differences(expected, state):
        raise ModelFileError(
            f"{label}: the file is damaged or inconsistent: its weights do not match the network its network_def "
            f"describes ({differences}); get or save it again"
        )


def build_network(network_def: dict[str, Any]) -> torch.nn.Module:
    """Instantiate a network from a checked model-file ``network_def`` (no config code is evaluated)."""
    args = {k: v for k, v in checked_network_def(network_def, "network_def").items() if k != "_target_"}
    return NETWORK_CLASSES[network_def["_target_"]](**args)


def tensor_differences(expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor]) -> str:
    """The first tensors of ``state`` whose shapes differ from ``expected`` (key -> shape) and the counts of missing /
    unexpected ones, in one short phrase; '' when they fit."""
    shapes = [f"{k} {tuple(v.shape)} vs {expected[k]}" for k, v in state.items()
              if k in expected and tuple(v.shape) != expected[k]]  # fmt: skip
    missing, unexpected = [k for k in expected if k not in state], [k for k in state if k not in expected]
    parts = [f"{len(shapes)} tensor shape(s) differ, file vs network: {'; '.join(shapes[:2])}"] if shapes else []
    parts += [f"{len(missing)} tensor(s) missing, e.g. {', '.join(missing[:2])}"] if missing else []
    parts += [f"{len(unexpected)} unexpected, e.g. {', '.join(unexpected[:2])}"] if unexpected else []
    return "; ".join(parts)[:300]


def inferred_network_def(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The ``network_def`` ids that the tensors of an older model file (one without a ``network_def``) show: per
    stage its width (``features``: the output channels of its last conv), ``kernel_sizes`` (that conv's kernel) and
    ``strides`` (the kernel of the transposed conv that upsamples it); ``num_classes`` (the first head's outputs);
    and for a UniSeg ``num_tasks`` and ``patch_size`` (the universal prompt's channels, and its size times the total
    stride: the prompt is the bottleneck's size). Ids it cannot read are left out; ``{}`` for other files."""

    def shape(key: str) -> tuple[int, ...] | None:
        value = state.get(key)
        return tuple(int(n) for n in value.shape) if isinstance(value, torch.Tensor) and value.ndim == 5 else None

    stages = 1 + sum(1 for s in range(MAX_STAGES) if shape(f"encoder.{s}.1.conv.weight"))
    convs = [shape(f"encoder.{s}.1.conv.weight") for s in range(stages - 1)] + [shape("bottleneck.1.conv.weight")]
    ups = [shape(f"decoder.{stages - 1 - s}.upsample.conv.weight") for s in range(1, stages)]
    if stages < 2 or None in convs:
        return {}
    found: dict[str, Any] = {
        "features": [c[0] for c in convs],  # type: ignore[index]
        "kernel_sizes": [list(c[2:]) for c in convs],  # type: ignore[index]
    }
    if None not in ups:
        found["strides"] = [[1, 1, 1]] + [list(u[2:]) for u in ups]  # type: ignore[index]
    if head := shape("heads.0.conv.weight"):
        found["num_classes"] = head[0]
    if (prompt := shape("universal_prompt")) and "strides" in found:
        total = [math.prod(s[a] for s in found["strides"]) for a in range(3)]
        found["num_tasks"] = prompt[1]
        found["patch_size"] = [n * t for n, t in zip(prompt[2:], total)]
    return found


def mismatch(network: torch.nn.Module, model: ModelFile, err: RuntimeError) -> str:
    """Why ``model`` did not load into ``network``, in one short line with the option that fixes it: the
    ``network_def`` fields that differ (the file's own, or for an older file without one the stage widths its
    tensors show), else the first tensors whose shapes differ and the counts of missing / unexpected tensors."""
    import json

    from uniseg_monai.networks import nnunet_features

    ours = getattr(network, "network_def", dict)()
    theirs = dict(model.network_def or {}) or inferred_network_def(model.state)  # an older file: what its tensors show
    if not model.network_def and ours.get("prompt_channels"):
        theirs.pop("num_tasks", None)  # the prompt's channels are not the task count of such a variant
    differ = [k for k in dict.fromkeys([*theirs, *ours]) if k in theirs and ours.get(k) != theirs.get(k)]
    if differ:
        fixes = []
        for k in differ:
            if k == "features" and list(nnunet_features(theirs[k][0], num_stages=len(theirs[k]))) == theirs[k]:
                fixes.append(f"--base_features {theirs[k][0]}")
            elif k in ("features", "kernel_sizes", "strides", "patch_size"):  # ids of the bundle configs
                fixes.append(f"--{k} {json.dumps(theirs[k], separators=(',', ':'))}")
        text = "; ".join(f"{k}: file {theirs.get(k)} vs config {ours.get(k)}" for k in differ)
        text = text if len(text) <= 240 else text[:237] + "..."
        return text + (f": pass {' '.join(fixes)}" if fixes else "")
    expected = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    return tensor_differences(expected, model.state) or " ".join(str(err).split())[:300]


def load_into(network: torch.nn.Module, source: str | os.PathLike | ModelFile) -> ModelFile:
    """Load a model file (a path, or one read already) into ``network`` (strict); a mismatch is one short line
    that names the file, what differs and the option that fixes it (:func:`mismatch`)."""
    model = source if isinstance(source, ModelFile) else read_model(source)
    path = model.path
    target = network.module if hasattr(network, "module") else network
    try:
        target.load_state_dict(model.state, strict=True)
    except RuntimeError as err:
        raise ModelFileError(
            f"{path}: the weights were trained with other network settings than this config "
            f"({mismatch(target, model, err)}); or use the model's own bundle"
        ) from None  # load_state_dict's message lists every tensor: the line above says what matters
    return model


def network_from_file(path: str | os.PathLike) -> tuple[torch.nn.Module, ModelFile]:
    """The network a self-describing model file (or an official container) defines, with its weights loaded."""
    model = read_model(path)
    if model.network_def is None:
        raise ModelFileError(f"{path}: this file does not say which network it holds (no network_def)")
    network = build_network(model.network_def)
    network.load_state_dict(model.state, strict=True)
    return network, model


def model_tasks(ckpt_dir: str | os.PathLike) -> TaskRegistry:
    """The tasks of the model in ``ckpt_dir``: those ``model.pt`` carries, else its ``tasks.json``."""
    path = Path(ckpt_dir) / MODEL_FILE
    if path.is_file():
        tasks = read_model(path).tasks
        if tasks is not None:
            return tasks
    if (Path(ckpt_dir) / MODEL_TASKS_FILE).is_file():
        return load_model_tasks(ckpt_dir)
    raise ModelFileError(
        f"{ckpt_dir}: no model with a task table ({MODEL_FILE} carrying its tasks, or {MODEL_TASKS_FILE}): "
        "get weights with `uniseg weights --bundle BUNDLE` or train the bundle"
    )


def saved_setting(ckpt_dir: str | os.PathLike, name: str, default: Any = None) -> Any:
    """Argument ``name`` of the network that ``<ckpt_dir>/model.pt`` describes, else ``default``: the bundle ids of
    what only the model file knows (``added_tasks`` and ``class_groups`` of a model that ``uniseg add-task`` grew),
    so that every config of the bundle builds the network the file holds."""
    path = Path(ckpt_dir) / MODEL_FILE
    if not path.is_file():
        return default
    return (_saved_network_def(str(path), path.stat().st_mtime_ns) or {}).get(name, default)


@functools.lru_cache(maxsize=4)
def _saved_network_def(path: str, mtime_ns: int) -> dict[str, Any] | None:
    """The ``network_def`` of a model file, read once per version of the file."""
    return read_model(path).network_def


def save_atomic(obj: Any, dst: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``dst``, then rename: never a half-written ``dst``."""
    write_atomic(dst, lambda f: torch.save(obj, f))


def save_model(
    dst: str | os.PathLike,
    state: dict[str, torch.Tensor],
    network_def: dict[str, Any],
    tasks: TaskRegistry,
    provenance: dict[str, Any] | None = None,
) -> None:
    """Write a self-describing model file (``model``, ``network_def``, ``tasks``[, ``provenance``]) atomically."""
    obj: dict[str, Any] = {"model": state, "network_def": network_def, "tasks": tasks.to_json()}
    if provenance:
        obj["provenance"] = provenance
    save_atomic(obj, dst)


def convert_official(
    src: str | os.PathLike, dst: str | os.PathLike, task: str = "", overwrite: bool = False
) -> dict[str, Any]:
    """Convert an official UniSeg checkpoint to a self-describing model file at ``dst`` (atomically; an existing
    ``dst`` is kept unless ``overwrite``). The task table: the paper's 11 tasks for the upstream model; for a
    downstream one, ``task`` (a built-in task with its class count) or the one built-in task of that class count.
    """
    dst = Path(dst)
    check_destination(src, dst, "DST")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
    model = read_model(src)
    if not model.official:
        raise ModelFileError(f"{src}: not an official UniSeg checkpoint (no nnU-Net key names)")
    if task and model.tasks is not None and model.tasks.names != [task]:  # never silently another table than asked
        names = ", ".join(model.tasks.names)
        if "num_tasks" in model.network_def:
            raise UsageError(
                f"--task {task!r}: {src} is an upstream checkpoint: its tasks are the paper's {len(model.tasks)} "
                f"({names}), fixed by its task prompts, so --task does not apply; drop --task"
            )
        raise UsageError(
            f"--task {task!r}: the {MODEL_TASKS_FILE} beside {src} defines its task ({names}), so --task would be "
            f"ignored; drop --task or edit that {MODEL_TASKS_FILE}"
        )
    tasks = model.tasks if model.tasks is not None else downstream_tasks(model.network_def["num_classes"], task, src)
    network = build_network(model.network_def)
    try:
        network.load_state_dict(model.state, strict=True)
    except RuntimeError as err:
        raise ModelFileError(f"{src}: converted weights do not fit the inferred network: {err}") from err
    provenance = official_provenance(Path(src), "uniseg convert-official")
    save_model(dst, model.state, model.network_def, tasks, provenance)
    return {
        "kind": "upstream" if "num_tasks" in model.network_def else "downstream",
        "network_def": model.network_def,
        "tasks": tasks.names,
        "parameters": sum(p.numel() for p in network.parameters()),
        "dst": str(dst),
        "licence": OFFICIAL_LICENCE,
    }


def check_destination(
    src: str | os.PathLike | None, dst: str | os.PathLike, option: str, example: str = MODEL_FILE
) -> None:
    """Refuse (one line naming ``option``: what was given, what is expected, the fix) a destination that is a folder,
    or that is the source file ``src`` itself (also through a symbolic or hard link): writing would replace the
    user's source (convert-official, weights, export). Checked before "exists; pass --overwrite", which would not
    help. ``example``: the file name suggested in the folder."""
    dst = Path(dst)
    if dst.is_dir():
        raise UsageError(
            f"{option} {dst} is a folder, but it must be the file to write: give a file name, e.g. {dst / example}"
        )
    if src is None:
        return
    src = Path(src)
    if dst.exists() and src.exists() and os.path.samefile(src, dst):
        raise UsageError(
            f"{option} {dst} is the source file {src} itself (it would be replaced): write to another file"
        )


def downstream_tasks(num_classes: int, task: str, src: str | os.PathLike) -> TaskRegistry:
    """The task table of an official downstream checkpoint with ``num_classes`` classes: the built-in task ``task``,
    else the only built-in task with that class count."""
    builtin = TaskRegistry()
    fitting = [t.name for t in builtin.values() if t.num_classes == num_classes]
    own = (
        f'define your own task in a {MODEL_TASKS_FILE} beside {src} ({{"tasks": {{"NAME": {{"id": 0, "modalities": '
        f'[...], "labels": [{num_classes} names], "spacing": [x, y, z]}}}}}}, keys as in a datalist\'s "tasks") and '
        "convert again"
    )
    if task:
        check_task_name(task, "--task")
        if task in fitting:
            return builtin.subset([task])
        raise ModelFileError(
            f"{src}: --task {task!r} is not a built-in task with {num_classes} classes (those: {fitting}); {own}"
        )
    if len(fitting) == 1:
        return builtin.subset(fitting)
    choose = f"name its task with --task (one of {fitting}), or " if fitting else "no built-in task has them: "
    raise ModelFileError(f"{src}: a downstream model with {num_classes} classes: {choose}{own}")


def official_provenance(src: Path, tool: str, url: str = "") -> dict[str, Any]:
    """Where converted official weights came from, and their licence."""
    return {
        "source": url or str(src.resolve()),
        "source_sha256": sha256(src),
        "converted_with": tool,
        "converted_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "licence": OFFICIAL_LICENCE,
    }


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ModelLoader:
    """Load a model file into ``network`` when an engine starts (``CheckpointLoader`` for inference, accepting
    every model file :func:`read_model` reads, official containers included).

    Args:
        load_path: the model file.
        network: the network to fill (strict: every tensor with its shape).
    """

    def __init__(self, load_path: str | os.PathLike, network: torch.nn.Module) -> None:
        self.load_path = load_path
        self.network = network

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        load_into(self.network, self.load_path)
        logger.info("loaded %s", self.load_path)
