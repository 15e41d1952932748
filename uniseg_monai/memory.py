"""Host memory that ``uniseg predict`` needs for one case, estimated from the image's shape, affine and tasks before
any voxel is resampled, and the memory the machine can give (:func:`available_memory`).

Calibrated with ``benchmarks/predict_memory.py --part host`` (peak RSS of a whole predict of one CT): the estimate
lies above the measured peak and within 1.5x of it for volumes past a few million voxels (numbers in
:func:`case_memory`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from uniseg_monai.data.geometry import resampled_voxels, voxel_spacing
from uniseg_monai.tasks import Task

GIB = 2**30
OVERHEAD = 160 * 2**20  # a case's fixed cost: PyTorch / oneDNN buffers and thread pools of the first case, Python


def available_memory() -> int | None:
    """Bytes the machine can give now: ``MemAvailable`` of /proc/meminfo, else the total physical memory, else
    None (unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def resample_bytes(channels: int, source: int, target: int) -> int:
    """Peak bytes of one MONAI resampling (``Spacingd`` and its inverse compute in float64) of ``channels`` from
    ``source`` to ``target`` voxels: the float64 copy of the source, then the larger of ``affine_grid``'s float64
    grids (homogeneous base grid and sampling grid: 56 B per target voxel) and ``grid_sample``'s float64 output with
    its float32 copy."""
    return 8 * channels * source + target * max(56, 24 + 8 * channels, 12 * channels)


def window_padding(shape: Sequence[int], affine: np.ndarray, task: Task, window: Sequence[int]) -> float:
    """How much the sliding window's padding enlarges the resampled volume: an axis shorter than the window (in RAS
    order, after resampling to the task's spacing) is padded to the window."""
    axes = nib.orientations.io_orientation(np.asarray(affine, dtype=float))[:, 0]
    spacing = voxel_spacing(affine)
    factor = 1.0
    for i, ras in enumerate(axes):
        j = i if np.isnan(ras) else int(ras)
        size = shape[i] * spacing[i] / task.spacing[j]
        factor *= max(1.0, window[j] / max(size, 1e-6))
    return factor


def case_memory(
    shape: Sequence[int],
    channels: int,
    affine: np.ndarray,
    passes: Sequence[Sequence[Task]],
    window: Sequence[int],
    network: dict | None = None,
) -> int:
    """Estimated peak host memory (bytes, above what the process holds before the case) of predicting one case of
    ``shape`` (X, Y, Z) x ``channels`` with ``affine``, one sliding-window pass per group of ``passes``.

    Float32 unless said; N = input voxels, N' = voxels at the pass's spacing (:func:`resampled_voxels`), W = N'
    padded to the ``window`` (:func:`window_padding`), K = classes of the pass (summed over its tasks), c = the
    most classes of one of its tasks, T = tasks:

    - the loaded image, 4 C N (twice when there are several passes: each pass gets a copy);
    - the largest of the pass's three stages:
      preprocessing = 4 C N (reoriented copy) + :func:`resample_bytes` (C, N -> N');
      inference = 4 C (N' + W) (image, padded input) + 4 (K + 1) W (stitched logits and weight map) + the
      network's windows when it runs on the CPU (``network``: features, strides, batch, window voxels V:
      4 V (24 + 4.5 sum_s features_s / stride_s), measured for UniSeg at base 1-32);
      postprocessing = 4 C N' + 4 K W (logits) + 4 c N' (softmax) + :func:`resample_bytes` (c, N' -> N) (inverse
      resampling to the input grid; argmax and the uint8 maps come after it, smaller) + T N (maps so far);
    - with several tasks, the merge: (26 + T) N (int64 map and temporaries);
    - :data:`OVERHEAD`, and 10 % for the allocator.

    Calibration: ``python benchmarks/predict_memory.py --shape X Y Z --spacing 0.8 0.8 1.0 --part host`` (liver,
    base_features 1 on the CPU), peak RSS above the 0.42 GiB the process holds before the case -> estimate:
    256x256x150 0.70 -> 0.84 GiB, 384x384x300 2.79 -> 3.14 GiB, 512x512x300 4.82 -> 5.47 GiB (1.13-1.2x); a
    16x16x8 image 0.27 -> 0.51 GiB (fixed costs). Windows of UniSeg at 192x192x64 on the CPU, base 1 / 4 / 8 /
    16 / 32: 0.25 / 0.44 / 0.59 / 1.11 / 2.12 GiB measured, 0.28 / 0.47 / 0.74 / 1.26 / 2.31 GiB estimated.
    """
    n, c = int(np.prod(shape[-3:])), int(channels)
    per_pass = []
    for group in passes:
        task = group[0]
        resampled = resampled_voxels(shape, affine, task)
        padded = math.ceil(resampled * window_padding(shape, affine, task, window))
        classes, most = sum(t.num_classes for t in group), max(t.num_classes for t in group)
        pre = 4 * c * n + resample_bytes(c, n, resampled)
        net = 0
        if network:
            width = sum(f / math.prod(s for stage in network["strides"][: i + 1] for s in stage)
                        for i, f in enumerate(network["features"]))  # fmt: skip
            net = 4 * network["batch"] * math.prod(window) * (24 + 4.5 * width)
        inference = 4 * c * (resampled + padded) + 4 * (classes + 1) * padded + net
        post = 4 * c * resampled + 4 * classes * padded + 4 * most * resampled + resample_bytes(most, resampled, n)
        per_pass.append(max(pre, inference, post + len(group) * n))
    tasks = sum(len(g) for g in passes)
    total = 4 * c * n * (2 if len(passes) > 1 else 1) + max(per_pass + ([(26 + tasks) * n] if tasks > 1 else []))
    return int(1.1 * total) + OVERHEAD
