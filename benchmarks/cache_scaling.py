"""Memory and speed of the bundle's training data pipeline with the in-memory and the disk cache
(``dataset_type`` memory / disk), on a synthetic datalist of small CT volumes.

Run: ``python benchmarks/cache_scaling.py`` (defaults: 100, 200 and 400 cases of 64^3 voxels in a temporary folder).
For every N and cache, a fresh process builds ``train#dataloader`` of ``bundles/uniseg_pretrain/configs/train.json``
(its moreDA augmentation, ``num_workers`` 0) and prints its resident memory (VmRSS) at the first batch; the disk
cache runs twice, filling the cache and reusing it. Then one process draws batches from both caches in alternating
rounds (same seed, so the same crops and augmentations in a round) and prints iterations/s of each and the median of
the rounds' ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TASK = {"id": 0, "modalities": ["CT"], "labels": ["background", "lesion"], "spacing": [1.5, 1.5, 1.5],
        "normalization": ["ct"]}  # fmt: skip


def write_cases(folder: Path, n: int, size: int) -> None:
    """``n`` CT volumes of ``size``^3 voxels at the task spacing, each with one spherical lesion."""
    rng = np.random.default_rng(0)
    affine = np.diag([*TASK["spacing"], 1.0])
    grid = np.indices((size,) * 3)
    for i in range(n):
        centre = rng.integers(size // 4, 3 * size // 4, 3)
        lesion = ((grid - centre[:, None, None, None]) ** 2).sum(0) < (size // 8) ** 2
        ct = rng.normal(40, 20, (size,) * 3) + 60 * lesion
        nib.save(nib.Nifti1Image(ct.astype(np.int16), affine), folder / f"case_{i:04d}.nii.gz")
        nib.save(nib.Nifti1Image(lesion.astype(np.uint8), affine), folder / f"case_{i:04d}_seg.nii.gz")


def write_datalist(folder: Path, n: int) -> Path:
    cases = [{"image": f"case_{i:04d}.nii.gz", "label": f"case_{i:04d}_seg.nii.gz", "task": "bench"} for i in range(n)]
    path = folder / f"datalist_{n}.json"
    path.write_text(json.dumps({"tasks": {"bench": TASK}, "training": cases}))
    return path


def loader(datalist: Path, kind: str, cache_dir: Path, patch: list[int]):
    """The bundle's ``train#dataloader`` with ``dataset_type`` ``kind``, seeded as a bundle run seeds it."""
    from monai.bundle import ConfigParser
    from monai.utils import set_determinism

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / "uniseg_pretrain" / "configs" / "train.json"))
    parser.update({"datalist": str(datalist), "dataset_type": kind, "cache_dir": str(cache_dir),
                   "patch_size": patch, "num_workers": 0, "iterations_per_epoch": 10**6})  # fmt: skip
    set_determinism(seed=0)
    return parser.get_parsed_content("train#dataloader")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise OSError("no VmRSS in /proc/self/status")


def child_memory(datalist: Path, kind: str, cache_dir: Path, patch: list[int]) -> dict:
    import torch
    from monai.bundle import ConfigParser  # noqa: F401  (imported before the clock starts)

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    batches = iter(loader(datalist, kind, cache_dir, patch))
    build = time.perf_counter() - t0
    next(batches)
    return {"rss_mib": rss_mib(), "build_s": build}


def child_speed(datalist: Path, cache_dir: Path, patch: list[int], iterations: int, rounds: int) -> dict:
    import torch

    torch.set_num_threads(1)
    batches = {kind: iter(loader(datalist, kind, cache_dir, patch)) for kind in ("memory", "disk")}
    rates: dict[str, list[float]] = {"memory": [], "disk": []}
    for r in range(rounds):  # both draw the same batches in a round; the one that goes first alternates
        for kind in ("memory", "disk")[:: 1 if r % 2 else -1]:
            t0 = time.perf_counter()
            for _ in range(iterations):
                next(batches[kind])
            rates[kind].append(iterations / (time.perf_counter() - t0))
    ratios = [d / m for d, m in zip(rates["disk"], rates["memory"])]
    return {**{kind: statistics.median(r) for kind, r in rates.items()}, "ratio": statistics.median(ratios)}


def run_child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, nargs="+", default=[100, 200, 400])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--patch", type=int, nargs=3, default=[48, 48, 32])
    parser.add_argument("--iterations", type=int, default=10, help="batches per timed round")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    patch = [str(p) for p in args.patch]
    if args.child:
        mode, datalist, cache_dir = args.child[:3]
        if mode == "speed":
            result = child_speed(Path(datalist), Path(cache_dir), args.patch, args.iterations, args.rounds)
        else:
            result = child_memory(Path(datalist), mode, Path(cache_dir), args.patch)
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder, cache_dir = Path(tmp), Path(tmp) / "cache"
        write_cases(folder, max(args.cases), args.size)
        print(f"{args.size}^3 CT cases, patch {args.patch}, batch 2, num_workers 0")
        print("resident memory (MiB) at the first batch, and seconds to build the loader (caching included)")
        print(f"{'cases':>6}{'memory':>17}{'disk, filling':>19}{'disk, reusing':>19}")
        for n in args.cases:
            datalist = str(write_datalist(folder, n))
            runs = [run_child("--child", kind, datalist, str(cache_dir), "--patch", *patch)
                    for kind in ("memory", "disk", "disk")]  # fmt: skip
            print(f"{n:>6}" + "".join(f"{r['rss_mib']:>10.0f}{r['build_s']:>6.1f}s" for r in runs[:1])
                  + "".join(f"{r['rss_mib']:>12.0f}{r['build_s']:>6.1f}s" for r in runs[1:]))  # fmt: skip
        n = args.cases[len(args.cases) // 2]
        speed = run_child("--child", "speed", str(folder / f"datalist_{n}.json"), str(cache_dir), "--patch", *patch,
                          "--iterations", str(args.iterations), "--rounds", str(args.rounds))  # fmt: skip
        print(f"{n} cases, {args.rounds} alternating rounds of {args.iterations} batches, median it/s: memory "
              f"{speed['memory']:.2f}, disk {speed['disk']:.2f}; disk/memory (median over rounds) "
              f"{speed['ratio']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
