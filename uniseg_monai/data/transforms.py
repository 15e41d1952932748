"""Task-aware MONAI transforms: every item carries ``task`` (a registry name), and the task decides target spacing,
per-channel intensity normalisation, label mapping and the classes of foreground oversampling.

The pipelines themselves are lists of these and MONAI's transforms in the bundle configs (``train.json``:
``train#deterministic_transforms``, ``train#sampling_transforms``, ``augmentation_transforms``;
``inference.json``: ``preprocessing``), so every step and value is an id a user can override.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import DtypeLike, KeysCollection
from monai.data import MetaTensor
from monai.data.utils import AFFINE_TOL
from monai.transforms import (
    ClassesToIndices,
    ClassesToIndicesd,
    Compose,
    Invertd,
    InvertibleTransform,
    LoadImaged,
    MapTransform,
    Randomizable,
    Spacingd,
    SpatialCrop,
    Transform,
)
from monai.transforms.utils import generate_label_classes_crop_centers
from monai.utils import TraceKeys, convert_to_dst_type

from uniseg_monai.core.atomic import inside
from uniseg_monai.core.notices import quiet_itk
from uniseg_monai.tasks import Normalization, Task, TaskRegistry, resolve_task

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def image_stem(source: str | Sequence[str]) -> str:
    """File name without folder and image extension (of the first file when one file per channel)."""
    if isinstance(source, (list, tuple)):
        source = source[0] if source else ""
    name = Path(str(source)).name
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class _TaskAware(MapTransform):
    def __init__(self, keys: KeysCollection, registry: TaskRegistry, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.registry = registry

    def task(self, data: Mapping[Hashable, Any]) -> Task:
        return self.registry[data["task"]]


class ResampleToTaskSpacingd(_TaskAware, InvertibleTransform):
    """Resample ``keys`` to the item's task spacing (x, y, z mm); ``mode`` per key (image linear, label nearest),
    computed in ``dtype`` (MONAI's default float64; float32 needs no float64 copy of the image and half the
    sampling grid, 28 instead of 56 bytes per resampled voxel).

    Invertible (``Invertd`` restores the original grid) through the task's own ``Spacingd``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        registry: TaskRegistry,
        mode: Sequence[str] | str = ("bilinear", "nearest"),
        allow_missing_keys: bool = False,
        dtype: DtypeLike = np.float64,
    ) -> None:
        super().__init__(keys, registry, allow_missing_keys)
        self._spacing = {
            t.name: Spacingd(keys, pixdim=t.spacing, mode=mode, dtype=dtype, allow_missing_keys=allow_missing_keys)
            for t in registry.values()
        }

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        # MONAI's Spacingd calls .update() on every "<key>_*" entry of a NIfTI item (legacy meta dicts); MONAI Label
        # adds "image_path" (a string), so entries that are not dicts are set aside and put back afterwards.
        aside = {
            k: v
            for k, v in data.items()
            if isinstance(k, str) and not isinstance(v, dict) and any(k.startswith(f"{key}_") for key in self.keys)
        }
        out = self._spacing[self.task(data).name]({k: v for k, v in data.items() if k not in aside})
        return {**out, **aside}

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Undo the resampling; the task comes from ``task`` or, inside ``Invertd``, from the meta data that
        :class:`RecordTaskd` wrote."""
        name = data.get("task")
        for key in self.key_iterator(dict(data)):
            name = name or getattr(data[key], "meta", {}).get("task")
        if name is None:
            raise ValueError("cannot invert the task resampling: no 'task' in the item nor in its meta data")
        return self._spacing[self.registry[name].name].inverse(data)


def _source_rows(
    scale: float, shift: float, size: int, rows: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source coordinates ``scale * i + shift`` of target rows i < ``rows`` along one axis of a ``size``-row source,
    clamped to it (``grid_sample``'s border padding): lower row (rows,), upper row (rows,), weight of the upper."""
    coords = (torch.arange(rows, dtype=torch.float64, device=device) * scale + shift).clamp_(0, size - 1)
    low = coords.floor()
    return low.long(), (low + 1).clamp_(max=size - 1).long(), (coords - low).float()


def _lerp(x: torch.Tensor, dim: int, low: torch.Tensor, high: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``x`` along ``dim`` between its rows ``low`` and ``high`` (1-D indices), on a
    (outer, rows, inner) view (``index_select`` on a 4-D tensor's last dimension is slower)."""
    size = x.shape
    flat = x.reshape(math.prod(size[:dim]), size[dim], math.prod(size[dim + 1 :]))
    out = flat.index_select(1, low).lerp_(flat.index_select(1, high), weight.view(1, -1, 1))
    return out.view(*size[:dim], len(low), *size[dim + 1 :])


def _argmax(x: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` = argmax of x (C, ...) over C, the first maximum winning ties (as ``torch.argmax``), by a running
    maximum: faster than ``argmax(0)``, which reduces over the slowest dimension."""
    best = x[0]
    out.zero_()
    for k in range(1, len(x)):
        out.masked_fill_(x[k] > best, k)
        best = torch.maximum(best, x[k])


class InvertArgmaxd(MapTransform):
    """``Activationsd(softmax)`` -> ``Invertd(transform)`` -> ``AsDiscreted(argmax)`` of ``keys`` with only the
    labels on the input grid: logits (C, X', Y', Z') on the grid ``transform`` made -> labels (1, X, Y, Z) (uint8)
    on the input grid, with the meta data ``Invertd`` gives.

    The softmax overwrites the logits when they are float32. The last step of ``transform`` (a linear
    ``SpatialResample``, e.g. :class:`ResampleToTaskSpacingd`, with border padding) is undone here for ``block``
    (C x voxels) at a time: separable linear interpolation along x, y, z (the weights of ``grid_sample``'s trilinear
    ones, in float32), then the argmax (the first maximum wins ties, as ``torch.argmax``). Its earlier steps (e.g.
    ``Orientationd``: flips and axis permutations) are undone on the labels by MONAI's ``Invertd``. Memory: the
    probabilities, the labels (1 byte per input voxel) and one block (two float32 copies), instead of the C-channel
    probabilities on the input grid in float64 plus its sampling grid (8 C + 56 bytes per input voxel).
    """

    def __init__(self, keys: KeysCollection, transform: Compose, orig_keys: str = "image", block: int = 2**24) -> None:
        super().__init__(keys)
        steps = [t for t in transform.flatten().transforms if isinstance(t, InvertibleTransform)]
        self.orig_key, self.block = orig_keys, int(block)
        self.earlier = Invertd(orig_keys, Compose(steps[:-1]), orig_keys=orig_keys, nearest_interp=False)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.orig_key]
        ops = image.applied_operations
        last = ops[-1] if ops else {}
        info = last.get(TraceKeys.EXTRA_INFO, {})
        if (last.get(TraceKeys.CLASS_NAME), info.get("mode"), info.get("padding_mode")) != (
            "SpatialResample", "bilinear", "border"
        ):  # fmt: skip
            raise ValueError(f"InvertArgmaxd undoes a last bilinear resampling with border padding; got {ops[-1:]}")
        target = np.asarray(info["src_affine"], dtype=np.float64)  # the grid before the resampling
        xform = np.linalg.solve(np.asarray(image.affine, dtype=np.float64), target)  # its voxel -> resampled voxel
        scale, shift = np.diag(xform)[:3], xform[:3, 3]
        if not np.allclose(xform[:3, :3], np.diag(scale), atol=1e-6):
            raise ValueError(f"InvertArgmaxd needs an axis-aligned resampling (scaling and shift), got {xform}")
        size = [int(n) for n in last[TraceKeys.ORIG_SIZE]]
        for key in self.key_iterator(d):
            probs = self.softmax(d[key])
            labels = self.labels(probs, scale, shift, size, np.allclose(xform, np.eye(4), atol=AFFINE_TOL))
            out = MetaTensor(labels[None], meta=dict(image.meta))
            out.affine = torch.as_tensor(target)
            out.applied_operations = ops[:-1]
            d[key] = self.earlier({self.orig_key: out})[self.orig_key]
        return d

    @staticmethod
    def softmax(logits: torch.Tensor) -> torch.Tensor:
        """Logits (C, ...) -> probabilities, in place when float32."""
        x = logits.as_tensor() if isinstance(logits, MetaTensor) else logits
        x = x.float()
        x.sub_(x.amax(0, keepdim=True)).exp_()
        return x.div_(x.sum(0, keepdim=True))

    def labels(
        self, probs: torch.Tensor, scale: np.ndarray, shift: np.ndarray, size: list[int], unchanged: bool
    ) -> torch.Tensor:
        """Probabilities (C, X', Y', Z') -> argmax (X, Y, Z) of their resampling to ``size``, where target voxel v
        samples source voxel ``scale * v + shift``; ``unchanged`` (the resampling was skipped, as MONAI skips an
        identity): the argmax itself."""
        labels = torch.empty(size, dtype=torch.uint8 if len(probs) <= 256 else torch.int16, device=probs.device)
        if unchanged and list(probs.shape[1:]) == size:
            _argmax(probs, labels)
            return labels
        axes = [_source_rows(scale[a], shift[a], probs.shape[a + 1], size[a], probs.device) for a in range(3)]
        rows = max(1, int(self.block / (len(probs) * size[1] * size[2] * max(1.0, scale[0]))))
        for start in range(0, size[0], rows):
            low, high, weight = (a[start : start + rows].tolist() for a in axes[0])
            first, last = low[0], high[-1] + 1  # the source rows these target rows read
            block = _lerp(_lerp(probs[:, first:last], 3, *axes[2]), 2, *axes[1])  # (C, last - first, Y, Z)
            for row, (i, j, w) in enumerate(zip(low, high, weight), start):
                _argmax(torch.lerp(block[:, i - first], block[:, j - first], w), labels[row])
        return labels


def normalize_channel(x: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """One channel (X, Y, Z) normalised as the task says."""
    x = x.float()
    if norm.kind == "ct":
        low, high = norm.window
        return (x.clamp(low, high) - low) / (high - low)
    mask = x != 0 if norm.kind == "zscore_nonzero" else torch.ones_like(x, dtype=torch.bool)
    if not mask.any():
        return torch.zeros_like(x)
    values = x[mask]
    out = (x - values.mean()) / values.std(correction=0).clamp_min(1e-8)
    return torch.where(mask, out, torch.zeros_like(out))


class NormalizeTaskIntensityd(_TaskAware):
    """Per-channel intensity normalisation of (C, X, Y, Z) images from the item's task (``ct``/``zscore``/...)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        norms = self.task(d).normalization
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != len(norms):
                source = getattr(img, "meta", {}).get("filename_or_obj", key)
                raise ValueError(
                    f"{source}: task {d['task']!r} expects {len(norms)} channels, the image has {img.shape[0]}"
                )
            out = torch.stack([normalize_channel(img[c], n) for c, n in enumerate(norms)])
            d[key] = convert_to_dst_type(out, img, dtype=torch.float32)[0]
        return d


class MapTaskLabelsd(_TaskAware):
    """Apply the task's ``label_map`` (raw value -> task label; unmapped raw values become background)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label_map = self.task(d).label_map
        if not label_map:
            return d
        for key in self.key_iterator(d):
            raw = torch.as_tensor(d[key]).round().long().clamp_min(0)
            lut = torch.zeros(max(int(raw.max()), max(label_map)) + 1, dtype=torch.long)
            for src, dst in label_map.items():
                lut[src] = dst
            d[key] = convert_to_dst_type(lut[raw], d[key])[0]
        return d


class ResolveTaskd(Transform):
    """Set the item's ``task`` (name) and ``task_id`` (network index) by :func:`uniseg_monai.tasks.resolve_task`:
    its own task, else ``default`` (a bundle's ``task``; MONAI Label items come without one), else the only task."""

    def __init__(self, registry: TaskRegistry, default: str = "") -> None:
        self.registry, self.default = registry, default

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        task = resolve_task(data, self.registry, self.default)
        return {**data, "task": task.name, "task_id": task.id}


class RecordTaskd(MapTransform):
    """Copy the item's ``task``, ``task_id`` and ``case`` (the datalist's optional ``"case"``, else the image file
    stem) into the meta data of ``keys``, so they survive ``Invertd`` into reports and saved file names, and reach
    a task-aware inferer called without a task (MONAI Label calls ``inferer(inputs, network)``)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key].meta["task"] = d["task"]
            d[key].meta["task_id"] = d["task_id"]
            d[key].meta["case"] = d.get("case") or image_stem(d[key].meta.get("filename_or_obj", ""))
        return d


def task_file_name(metadict: dict, saver: Transform) -> dict[str, Any]:
    """``SaveImaged(output_name_formatter=...)``: ``<case>_<task>``, so one image segmented under several tasks
    gives one file per task (case: see :class:`RecordTaskd`); an :class:`~uniseg_monai.core.errors.InputError` unless
    that is a file name in the saver's output folder (:func:`~uniseg_monai.core.atomic.inside`). The subject carries a
    ``.nii.gz`` that MONAI strips, so dots in the name stay (MONAI would cut ``case_v1.2`` to ``case_v1``)."""
    metadict = metadict or {}
    stem = metadict.get("case") or image_stem(metadict.get("filename_or_obj", ""))
    task = metadict.get("task", "")
    subject = f"{stem}_{task}" if task else stem
    inside(saver.folder_layout.output_dir, subject)
    return {"subject": f"{subject}.nii.gz", "idx": metadict.get("patch_index")}


class ThreadSafeLoadImaged(MapTransform):
    """``LoadImaged`` with one instance per thread.

    MONAI 1.6's ``NibabelReader`` keeps per-call state (``self.filenames``), so one shared ``LoadImaged`` mixes up
    the channels of multi-file images (one file per channel) when ``CacheDataset`` caches with several threads.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **kwargs: Any) -> None:
        super().__init__(keys, allow_missing_keys)
        self._kwargs = {"allow_missing_keys": allow_missing_keys, **kwargs}
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:  # picklable for spawned DataLoader workers
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        if not hasattr(self._local, "load"):
            self._local.load = LoadImaged(self.keys, **self._kwargs)
        quiet_itk(*(data.get(key) for key in self.keys))
        return self._local.load(data)


CLASS_INDICES_KEY = "class_indices"


class TaskClassIndicesd(_TaskAware):
    """Cacheable: up to ``max_per_class`` voxel indices of every class of the item's task (nnU-Net stores 10,000),
    under ``class_indices``, so :class:`RandCropByTaskClassesd` need not scan the whole label for every patch."""

    def __init__(self, registry: TaskRegistry, max_per_class: int = 10000) -> None:
        super().__init__("label", registry)
        self._indices = {
            n: ClassesToIndicesd("label", num_classes=n, indices_postfix="", max_samples_per_class=max_per_class)
            for n in {t.num_classes for t in registry.values()}
        }

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        indices = self._indices[self.task(d).num_classes]
        d[CLASS_INDICES_KEY] = indices.converter(d["label"])  # one array of flat indices per class
        return d


def class_ratios(present: Sequence[bool], pos_fraction: float) -> list[float]:
    """Crop-centre probabilities of the classes (background first) given which ones the label holds: background
    1 - ``pos_fraction``, the present foreground classes ``pos_fraction`` shared equally; all on background when no
    foreground is present, all on the foreground when no background is."""
    foreground = [k for k, here in enumerate(present) if k and here]
    if not foreground or not present[0]:
        return [float(here and (k == 0 or not present[0])) for k, here in enumerate(present)]
    return [1 - pos_fraction if k == 0 else pos_fraction / len(foreground) if k in foreground else 0.0
            for k in range(len(present))]  # fmt: skip


class RandCropByTaskClassesd(_TaskAware, Randomizable):
    """nnU-Net's foreground oversampling, per task: with probability ``pos_fraction`` the patch is centred on a
    voxel of one of the task's foreground classes, the class drawn uniformly among those the label holds (so a
    small organ is sampled as often as a large one), otherwise on a background voxel; a class absent from the case
    changes nothing of that rate (:func:`class_ratios`). Uses the cached ``class_indices`` of
    :class:`TaskClassIndicesd` when present. Returns a list of one item (MONAI's crop-sampler convention) whose
    patches own their memory, so the input is never modified: the bundles' ``CacheDataset`` serves its cached items
    without the deep copy of every whole volume that ``copy_cache`` would make per sample."""

    def __init__(self, keys: KeysCollection, registry: TaskRegistry, spatial_size: Sequence[int], pos_fraction: float):
        super().__init__(keys, registry)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.pos_fraction = float(pos_fraction)

    def randomize(self, data: Any = None) -> None:  # the centre is drawn in __call__, from self.R
        pass

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        d = dict(data)
        label = d["label"]
        indices = d.pop(CLASS_INDICES_KEY, None)
        if indices is None:
            indices = ClassesToIndices(num_classes=self.task(d).num_classes)(label)
        ratios = class_ratios([len(i) > 0 for i in indices], self.pos_fraction)
        center = generate_label_classes_crop_centers(
            self.spatial_size, 1, label.shape[1:], indices, ratios, self.R, warn=False
        )[0]
        crop = SpatialCrop(roi_center=tuple(center), roi_size=self.spatial_size)
        for key in self.key_iterator(d):
            d[key] = crop(d[key]).clone()  # a view into the cached volume otherwise
        return [d]


class TrainingMetad(MapTransform):
    """The meta data a training batch needs: each key's MetaTensor keeps its data (no copy), affine and ``keep``
    entries (the file names, for error messages) and drops the rest (~40 header fields) and its transform records.

    A DataLoader worker sends every tensor of a batch to the main process through its own shared-memory handle, a
    socket round trip each: with full meta data (92 tensors per phantom batch) unpacking took more than half a training
    step in the main process (README, "Training speed"); with this, 5 tensors. The last transform of training only: the
    inverse of the pre-processing needs what it drops.
    """

    def __init__(self, keys: KeysCollection, keep: Sequence[str] = ("filename_or_obj",)) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.keep = tuple(keep)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], MetaTensor):
                meta = {k: d[key].meta[k] for k in ("affine", *self.keep) if k in d[key].meta}
                d[key] = MetaTensor(d[key].as_tensor(), meta=meta)
        return d
