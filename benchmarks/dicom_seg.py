"""DICOM SEG write time and size (BINARY vs LABELMAP) beside the NIfTI write of the same maps, as ``uniseg predict``
writes them (``apps.predict._nifti`` per task map + the merged map for ``--task all``; ``data.dicom_seg.build_seg``
+ saving the SEG to bytes).

Two series: the real 512x512x20 CT of ../shared (its headers, UIDs filled in as the tests do) and a synthetic
512x512x300 series (the same header, 300 positions 1 mm apart). The maps are synthetic: each class of the 7 CT tasks
of the paper (liver, kidney, hepatic_vessel, pancreas, colon, lung, spleen: 11 classes) is an ellipsoid blob, so
every class has voxels and tasks overlap (liver / hepatic_vessel). Only writing is timed, not the network.

    PYTHONPATH=$PWD python benchmarks/dicom_seg.py [--repeats 1]
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from uniseg_monai import __version__
from uniseg_monai.apps.predict import _nifti, merge
from uniseg_monai.data.dicom_seg import build_seg
from uniseg_monai.tasks import TaskRegistry

SAMPLE = Path(__file__).resolve().parents[2] / "shared/data/real_samples/totalseg_examples/ct_dicom"
TASKS = ("liver", "kidney", "hepatic_vessel", "pancreas", "colon", "lung", "spleen")


def instances(depth: int | None) -> list:
    """Sorted source headers: the sample's 20 (depth None), or ``depth`` copies of its first header 1 mm apart."""
    study, series = generate_uid(), generate_uid()
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(SAMPLE.iterdir())]
    if depth is not None:
        first = headers[0]
        headers = []
        for k in range(depth):
            ds = copy.deepcopy(first)
            ds.ImagePositionPatient = [*first.ImagePositionPatient[:2], float(first.ImagePositionPatient[2]) + k]
            ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            headers.append(ds)
    for ds in headers:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    return sorted(headers, key=lambda ds: float(ds.ImagePositionPatient[2]))


def grid(headers: list) -> tuple[tuple[int, int, int], np.ndarray]:
    """The (X, Y, Z) shape and RAS affine MONAI's ITK reader gives the axial series (rows along y, columns along x)."""
    row, col = (float(v) for v in headers[0].PixelSpacing)
    z = float(headers[1].ImagePositionPatient[2]) - float(headers[0].ImagePositionPatient[2])
    x0, y0, z0 = (float(v) for v in headers[0].ImagePositionPatient)
    affine = np.array([[-col, 0, 0, -x0], [0, -row, 0, -y0], [0, 0, z, z0], [0, 0, 0, 1]])
    return (int(headers[0].Columns), int(headers[0].Rows), len(headers)), affine


def blobs(shape: tuple[int, int, int], tasks: list, seed: int = 0) -> dict[str, np.ndarray]:
    """One ellipsoid per class (radii 8-25 % of the extent), uint8 maps per task."""
    rng = np.random.default_rng(seed)
    axes = np.ogrid[tuple(slice(0, n) for n in shape)]
    maps = {}
    for task in tasks:
        labels = np.zeros(shape, np.uint8)
        for k in range(1, task.num_classes):
            centre = rng.uniform(0.3, 0.7, 3) * shape
            radii = rng.uniform(0.08, 0.25, 3) * shape
            inside = sum(((a - c) / r) ** 2 for a, c, r in zip(axes, centre, radii)) <= 1
            labels[inside] = k
        maps[task.name] = labels
    return maps


def measure(depth: int | None, repeats: int) -> dict:
    registry = TaskRegistry()
    tasks = [registry[t] for t in TASKS]
    headers = instances(depth)
    shape, affine = grid(headers)
    maps = blobs(shape, tasks)
    row = {"series": "x".join(map(str, shape)), "tasks": len(tasks), "classes": sum(t.num_classes - 1 for t in tasks)}
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        encoded = {t.name: _nifti(maps[t.name], affine) for t in tasks}
        merged, _ = merge(maps, tasks)
        encoded["all_merged"] = _nifti(merged, affine)
        best = min(best, time.perf_counter() - tic)
    row["nifti_s"], row["nifti_mb"] = round(best, 2), round(sum(map(len, encoded.values())) / 1e6, 2)
    for seg_type in ("binary", "labelmap"):
        best = float("inf")
        for _ in range(repeats):
            tic = time.perf_counter()
            seg, content = build_seg(maps, affine, tasks, headers, seg_type, True, __version__, "benchmark")
            buffer = io.BytesIO()
            seg.save_as(buffer, enforce_file_format=True)
            best = min(best, time.perf_counter() - tic)
        row[f"{seg_type}_s"], row[f"{seg_type}_mb"] = round(best, 2), round(len(buffer.getvalue()) / 1e6, 2)
        row[f"{seg_type}_frames"], row[f"{seg_type}_segments"] = content["frames"], len(content["segments"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    import highdicom

    print(json.dumps({"highdicom": highdicom.__version__, "pydicom": pydicom.__version__}))
    for depth in (None, 300):
        print(json.dumps(measure(depth, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
