"""Host memory that ``uniseg predict`` needs for one case, estimated from the image's shape, affine and tasks before
any voxel is resampled, and the memory the machine can give (:func:`available_memory`).

Calibrated with ``benchmarks/predict_memory.py`` (peak RSS of a whole ``uniseg predict`` of one CT): the estimate
lies above the measured peak (the numbers: README, "Memory").
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


def loading_memory(shape: Sequence[int], channels: int) -> int:
    """Bytes that loading a file of ``shape`` (X, Y, Z) x ``channels`` takes: 8 per voxel and channel (MONAI's loader
    holds the file's voxels and their C-ordered float32 copy)."""
    return 8 * int(channels) * int(np.prod(shape[-3:]))


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

    N = input voxels, N' = voxels at the pass's spacing (:func:`resampled_voxels`), W = N' padded to the ``window``
    (:func:`window_padding`), K = classes of the pass (summed over its tasks), c = the most classes of one of its
    tasks, T = tasks so far, C = ``channels``; float32 unless said. The largest of:

    - loading: 8 C N (MONAI's loader holds the file's voxels and their C-ordered float32 copy);
    - per pass, over the input image kept for the next passes (4 C N when there are several) and the maps of the
      earlier ones (N per task, uint8), the largest of its stages:
      preprocessing = 4 C N (the pass's image) + 4 C N (its reoriented copy, unless the image is stored RAS) +
      28 N' (float32 sampling grids) + 4 C N' (resampled image);
      inference = 4 C (N' + W) (resampled and padded image) + 4 (K + 1) W (stitched logits and weight map) + the
      network's windows when it runs on the CPU (``network``: features, strides, batch, window voxels V:
      4 V (24 + 4.5 sum_s features_s / stride_s), fitted for UniSeg at base 1-32);
      postprocessing (:class:`~uniseg_monai.data.transforms.InvertArgmaxd`) = 4 C N' + 4 K W (the probabilities,
      in place of the logits) + 2 N (labels and their reorientation) + 8 min(2^24, c N) (one block) + the pass's
      maps;
    - with several tasks, the merge: (6 + T) N (merged map, mask and temporaries; uint8 up to 255 labels);
    - then :data:`OVERHEAD`, and 10 % for the allocator.

    Calibration: ``python benchmarks/predict_memory.py --depths 150 300 600 --no-network`` (measured against
    estimated: README, "Memory").
    """
    n, c = int(np.prod(shape[-3:])), int(channels)
    ras = (nib.orientations.io_orientation(np.asarray(affine, dtype=float)) == [[0, 1], [1, 1], [2, 1]]).all()
    held, per_pass = (4 * c * n if len(passes) > 1 else 0), []
    for group in passes:
        task = group[0]
        resampled = resampled_voxels(shape, affine, task)
        padded = math.ceil(resampled * window_padding(shape, affine, task, window))
        classes, most = sum(t.num_classes for t in group), max(t.num_classes for t in group)
        pre = 4 * c * n * (1 if ras else 2) + 28 * resampled + 4 * c * resampled
        net = 0
        if network:
            width = sum(f / math.prod(s for stage in network["strides"][: i + 1] for s in stage)
                        for i, f in enumerate(network["features"]))  # fmt: skip
            net = 4 * network["batch"] * math.prod(window) * (24 + 4.5 * width)
        inference = 4 * c * (resampled + padded) + 4 * (classes + 1) * padded + net
        post = 4 * c * resampled + 4 * classes * padded + 2 * n + 8 * min(2**24, most * n) + len(group) * n
        per_pass.append(held + max(pre, inference, post))
        held += len(group) * n
    tasks = sum(len(g) for g in passes)
    total = max([loading_memory(shape, c), *per_pass] + ([(6 + tasks) * n] if tasks > 1 else []))
    return int(1.1 * total) + OVERHEAD
