"""Image geometry checks shared by ``check-data``, the bundles' start-of-run checks and ``uniseg predict``: an
affine that can be inverted, voxel spacings in a sane range for the task, and the size of the resampled volume.

The checks read only what a file header holds (affine and shape), so they run in milliseconds per file.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from uniseg_monai.tasks import Task

SPACING_FACTOR = 10.0  # an input voxel may be at most 10x finer or coarser than the task's finest / coarsest spacing


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along the three array axes: the lengths of the affine's first three columns."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0))  # type: ignore[return-value]


def spacing_range(task: Task) -> tuple[float, float]:
    """The voxel sizes (mm) an image of ``task`` may have: [finest / 10, coarsest x 10] of its target spacing."""
    return min(task.spacing) / SPACING_FACTOR, max(task.spacing) * SPACING_FACTOR


def affine_problem(affine: np.ndarray) -> str | None:
    """Why ``affine`` (4 x 4, mm) is no voxel-to-world mapping (non-finite or singular), or None."""
    matrix = np.asarray(affine, dtype=float)
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        return f"affine is not a finite 4x4 matrix ({matrix.tolist()})"
    spacing = voxel_spacing(matrix)
    if abs(np.linalg.det(matrix[:3, :3])) <= 1e-6 * max(max(spacing), 1e-12) ** 3:
        shown = ", ".join(f"{s:g}" for s in spacing)
        return f"singular affine (voxel size {shown} mm, determinant 0: a zero pixdim or two axes along one direction)"
    return None


def geometry_problem(affine: np.ndarray, task: Task) -> str | None:
    """Why an image with ``affine`` (4 x 4, mm) cannot be resampled for ``task``, or None when it can.

    Refused: a non-finite or singular affine (a zero pixdim, or two axes along one direction: orientation and
    resampling are undefined) and a voxel size outside :func:`spacing_range` (a header in cm or µm, or a wrong
    pixdim, would make resampling allocate absurd volumes).
    """
    problem = affine_problem(affine)
    if problem:
        return problem
    spacing = voxel_spacing(affine)
    low, high = spacing_range(task)
    if min(spacing) < low or max(spacing) > high:
        shown = ", ".join(f"{s:g}" for s in spacing)
        return (
            f"voxel size ({shown}) mm is outside {low:g}-{high:g} mm, the range for task {task.name!r} "
            f"(target spacing {'x'.join(f'{s:g}' for s in task.spacing)} mm, factor {SPACING_FACTOR:g} either way)"
        )
    return None


def resampled_voxels(shape: Sequence[int], affine: np.ndarray, task: Task) -> int:
    """Voxels of a volume of ``shape`` (X, Y, Z) and ``affine`` once resampled to ``task``'s spacing: its physical
    volume over the target voxel's (independent of the orientation)."""
    physical = float(np.prod(np.asarray(shape[-3:], dtype=float)) * np.prod(voxel_spacing(affine)))
    return int(np.ceil(physical / float(np.prod(task.spacing))))
