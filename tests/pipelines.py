"""The pretrain bundle's transform pipelines for a given task registry, as the tests use them."""

from __future__ import annotations

from pathlib import Path

from monai.transforms import Transform

from uniseg_monai.apps.bundles import bundle_transforms
from uniseg_monai.tasks import TaskRegistry

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "uniseg_pretrain"


def train_preprocessing(registry: TaskRegistry) -> list[Transform]:
    """``train#deterministic_transforms``: load, orient, resample, normalise, map labels."""
    return bundle_transforms(registry, "train#deterministic_transforms", bundle=BUNDLE)


def inference_preprocessing(registry: TaskRegistry) -> list[Transform]:
    """``inference.json``'s ``preprocessing`` (images only)."""
    return bundle_transforms(registry, "preprocessing#transforms", bundle=BUNDLE, config="inference")


def crop_and_augmentation(registry: TaskRegistry, patch_size: list[int]) -> list[Transform]:
    """Pad, foreground-oversampled crop (``train#sampling_transforms`` without the cached class indices) and
    ``augmentation_transforms`` (moreDA)."""
    ids = ("train#sampling_transforms", "augmentation_transforms")
    return bundle_transforms(registry, *ids, bundle=BUNDLE, patch_size=patch_size)[1:]
