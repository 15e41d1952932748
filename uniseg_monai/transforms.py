"""Task-aware MONAI transforms and the UniSeg pre-processing / augmentation pipelines.

Every item carries ``task`` (a registry name); the task decides target spacing, per-channel intensity
normalisation and label mapping. :func:`preprocessing` is deterministic (cache it with CacheDataset or
PersistentDataset); :func:`augmentation` is the random part (nnU-Net "moreDA" strengths).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import (
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandAdjustContrastd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandRotated,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
    RandZoomd,
    Spacingd,
    SpatialPadd,
    Transform,
)
from monai.utils import convert_to_dst_type

from uniseg_monai.tasks import Normalization, Task, TaskRegistry


class _TaskAware(MapTransform):
    def __init__(self, keys: KeysCollection, registry: TaskRegistry, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.registry = registry

    def task(self, data: Mapping[Hashable, Any]) -> Task:
        return self.registry[data["task"]]


class ResampleToTaskSpacingd(_TaskAware):
    """Resample ``keys`` to the item's task spacing (x, y, z mm); ``mode`` per key (image linear, label nearest)."""

    def __init__(
        self,
        keys: KeysCollection,
        registry: TaskRegistry,
        mode: Sequence[str] | str = ("bilinear", "nearest"),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, registry, allow_missing_keys)
        self._spacing = {
            t.name: Spacingd(keys, pixdim=t.spacing, mode=mode, allow_missing_keys=allow_missing_keys)
            for t in registry.values()
        }

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return self._spacing[self.task(data).name](data)


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
                raise ValueError(f"task {d['task']!r} expects {len(norms)} channels, image {key!r} has {img.shape[0]}")
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


def preprocessing(
    registry: TaskRegistry, keys: Sequence[str] = ("image", "label"), image_mode: str = "bilinear"
) -> list[Transform]:
    """Deterministic part: load (NIfTI/NRRD/MHA/DICOM folder; a list of files = one file per channel),
    channel first, RAS orientation, task spacing, task intensity normalisation, task label map."""
    keys = list(keys)
    image_keys = [k for k in keys if k != "label"]
    modes = [image_mode if k != "label" else "nearest" for k in keys]
    return [
        LoadImaged(keys, image_only=True, ensure_channel_first=True, allow_missing_keys=True),
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")), allow_missing_keys=True),
        ResampleToTaskSpacingd(keys, registry, mode=modes, allow_missing_keys=True),
        NormalizeTaskIntensityd(image_keys, registry),
        MapTaskLabelsd("label", registry, allow_missing_keys=True),
        EnsureTyped(keys, dtype=torch.float32, allow_missing_keys=True),
    ]


def augmentation(patch_size: Sequence[int], pos_fraction: float = 0.33) -> list[Transform]:
    """Random part on ``image``/``label``: pad to the patch, foreground-oversampled crop, then nnU-Net "moreDA":
    rotation +-30 deg (p 0.2), scaling 0.7-1.4 (p 0.2), Gaussian noise (p 0.1), Gaussian blur sigma 0.5-1
    (p 0.2), brightness x0.75-1.25 (p 0.15), contrast x0.75-1.25 (p 0.15), simulated low resolution x0.5-1
    (p 0.25), gamma 0.7-1.5 inverted (p 0.1) and normal (p 0.3), mirroring on each axis (p 0.5)."""
    keys = ["image", "label"]
    angle = math.pi / 6
    return [
        SpatialPadd(keys, spatial_size=patch_size),
        RandCropByPosNegLabeld(
            keys, "label", spatial_size=patch_size, pos=pos_fraction, neg=1 - pos_fraction, num_samples=1
        ),
        RandRotated(keys, range_x=angle, range_y=angle, range_z=angle, prob=0.2, mode=("bilinear", "nearest")),
        RandZoomd(keys, min_zoom=0.7, max_zoom=1.4, prob=0.2, mode=("trilinear", "nearest")),
        RandGaussianNoised("image", prob=0.1, std=0.1**0.5),
        RandGaussianSmoothd("image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.2),
        RandScaleIntensityd("image", factors=0.25, prob=0.15),
        RandScaleIntensityFixedMeand("image", factors=0.25, preserve_range=True, prob=0.15),
        RandSimulateLowResolutiond("image", zoom_range=(0.5, 1.0), prob=0.25),
        RandAdjustContrastd("image", gamma=(0.7, 1.5), invert_image=True, retain_stats=True, prob=0.1),
        RandAdjustContrastd("image", gamma=(0.7, 1.5), retain_stats=True, prob=0.3),
        *(RandFlipd(keys, spatial_axis=axis, prob=0.5) for axis in range(3)),
    ]
