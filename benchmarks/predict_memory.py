"""Peak memory of ``uniseg predict`` for a large CT at the paper window (192x192x64), measured in subprocesses.

Two numbers, because on a GPU they land on different devices (windows run on the GPU, the volume is stitched,
inverted and written on the CPU):

1. host: the whole ``uniseg predict`` of one case (load, resample, sliding window with stitching on the CPU,
   softmax, inverse resampling, argmax, write) with the paper window and a 1-channel-wide network, so the
   network's share is negligible and the rest is what the volume costs; next to it the estimate that
   ``uniseg predict`` checks against ``--max_memory`` (``uniseg_monai.data.memory.case_memory``). The CT (random HU
   values) is written by another process, so the peak is the predict's alone;
2. network: one paper-size window (base 32, 11 tasks) through the paper network without gradients; on a GPU with
   AMP (float16) expect about half.

``--depths`` measures the host peak at several depths of the same slices and fits its slope (GiB per 100 M input
voxels). ``--compare`` also segments the case the way ``uniseg predict`` did before the bounded-memory inversion
(float64 resampling to the task spacing; ``Activationsd(softmax)`` -> ``Invertd`` -> ``AsDiscreted(argmax)``) and
prints the voxels that differ and the Dice per class (needs the old peak: ~10 GiB at 512x512x600).

    python benchmarks/predict_memory.py                            # 512x512x600 CT at 0.8x0.8x1.0 mm, task liver
    python benchmarks/predict_memory.py --depths 150 300 600 --no-network   # slope over three volumes
    python benchmarks/predict_memory.py --shape 512 512 150 --compare --no-network
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "uniseg_pretrain"


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def setup(shape: list[int], spacing: list[float], folder: Path) -> None:
    """Write the CT (int16, slab by slab) and a random liver model of base width 1 into ``folder``."""
    import nibabel as nib
    import numpy as np
    from monai.bundle import ConfigParser

    from uniseg_monai.model_io.model_files import save_model
    from uniseg_monai.tasks import TaskRegistry

    rng, ct = np.random.default_rng(0), np.empty(shape, np.int16)
    for z in range(shape[2]):
        ct[..., z] = rng.normal(40, 100, shape[:2])
    nib.save(nib.Nifti1Image(ct, np.diag([*spacing, 1.0])), folder / "ct.nii.gz")
    tasks = TaskRegistry().subset(["liver"])
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser.update({"bundle_root": str(BUNDLE), "registry": tasks, "base_features": 1})
    network = parser.get_parsed_content("network_def")
    save_model(folder / "model.pt", network.state_dict(), network.network_def(), tasks)


def host(folder: Path, compare: bool) -> None:
    """``uniseg predict`` of the case in ``folder``: peak RSS, the estimate, and with ``compare`` the old maps."""
    import nibabel as nib
    import numpy as np

    from uniseg_monai.apps.predict import Predictor, predict
    from uniseg_monai.data.memory import GIB, case_memory

    settings = {"bundle": str(BUNDLE), "checkpoint": str(folder / "model.pt"), "device": "cpu"}
    before = peak_gib()
    predict(str(folder / "ct.nii.gz"), str(folder / "out"), "liver", **settings)
    result = {"host_peak_gib": round(peak_gib(), 2), "before_predict_gib": round(before, 2)}
    ct = nib.load(folder / "ct.nii.gz")
    run = {"tta": False, "overlap": 0.5, "device": "$torch.device('cpu')"}
    predictor = Predictor(str(BUNDLE), settings["checkpoint"], "liver", run, False)
    tasks = predictor.tasks("liver", None)
    need = case_memory(ct.shape, 1, ct.affine, [tasks], predictor.window, predictor.windows_on_cpu)
    result["estimate_gib"] = round(need / GIB, 2)
    result["estimate_over_measured"] = round(need / GIB / (result["host_peak_gib"] - before), 2)
    if compare:
        new = np.asarray(nib.load(folder / "out" / "ct_liver.nii.gz").dataobj)
        old = old_maps(folder, tasks)["liver"]
        result["differing_voxels"] = int((new != old).sum())
        result["dice"] = {
            k: round(2 * float(((new == k) & (old == k)).sum()) / max(1, int((new == k).sum() + (old == k).sum())), 6)
            for k in range(tasks[0].num_classes)
            if (new == k).any() or (old == k).any()
        }
    print(json.dumps(result))


def old_maps(folder: Path, tasks) -> dict:
    """The maps of the case in ``folder`` as ``uniseg predict`` made them before: the same network, resampling to the
    task spacing in float64 (MONAI's default) and softmax -> ``Invertd`` -> argmax."""
    import numpy as np
    from monai.transforms import Activationsd, AsDiscreted, Compose, Invertd

    from uniseg_monai.apps.predict import Predictor

    steps = json.loads((BUNDLE / "configs" / "inference.json").read_text())["preprocessing"]["transforms"]
    resample = next(i for i, t in enumerate(steps) if t["_target_"].endswith("ResampleToTaskSpacingd"))
    run = {"tta": False, "overlap": 0.5, "device": "$torch.device('cpu')"}
    run[f"preprocessing#transforms#{resample}#dtype"] = "$torch.float64"
    predictor = Predictor(str(BUNDLE), str(folder / "model.pt"), "liver", run, False)
    predictor.postprocess = Compose([
        Activationsd("pred", softmax=True),
        Invertd("pred", predictor.preprocess, orig_keys="image", nearest_interp=False),
        AsDiscreted("pred", argmax=True),
    ])  # fmt: skip
    maps = predictor.segment(predictor.load({"image": str(folder / "ct.nii.gz")}), tasks)[0]
    return {task: np.asarray(labels, dtype=np.uint8) for task, labels in maps.items()}


def network() -> None:
    import torch

    from uniseg_monai.networks import UniSeg

    net = UniSeg(num_tasks=11, num_classes=4, patch_size=(192, 192, 64), features=[32, 64, 128, 256, 320, 320])
    window = torch.randn(1, 1, 192, 192, 64)
    before = peak_gib()
    with torch.no_grad():
        net.eval()(window, 0)
    print(json.dumps({"network_window_gib": round(peak_gib() - before, 2)}))


def run(*args: str) -> str:
    """This script with ``args`` in a fresh process; its last line of output."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 600], help="voxels (x, y, z)")
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 1.0], help="mm (x, y, z)")
    parser.add_argument("--depths", type=int, nargs="+", help="measure these z sizes of --shape's slices; slope")
    parser.add_argument("--compare", action="store_true", help="compare the maps with the old pipeline's")
    parser.add_argument("--no-network", action="store_true", help="skip the paper network's window")
    parser.add_argument("--part", choices=["setup", "host", "network"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part == "setup":
        return setup(args.shape, args.spacing, args.folder)
    if args.part == "host":
        return host(args.folder, args.compare)
    if args.part == "network":
        return network()
    voxels, peaks = [], []
    for depth in args.depths or [args.shape[2]]:
        shape = [*args.shape[:2], depth]
        size = [round(n * s / t) for n, s, t in zip(shape, args.spacing, (1.5, 1.5, 3.0))]
        print(f"CT {shape} at {args.spacing} mm -> {size} at the liver task's 1.5x1.5x3 mm; window 192x192x64")
        with tempfile.TemporaryDirectory() as tmp:
            run("--part", "setup", "--shape", *map(str, shape), "--spacing", *map(str, args.spacing), "--folder", tmp)
            result = json.loads(run("--part", "host", "--folder", tmp, *(["--compare"] if args.compare else [])))
        print("host", json.dumps(result))
        voxels.append(shape[0] * shape[1] * depth / 1e8)
        peaks.append(result["host_peak_gib"])
    if len(voxels) > 1:
        import numpy as np

        slope, intercept = np.polyfit(voxels, peaks, 1)
        print(f"host peak = {intercept:.2f} GiB + {slope:.2f} GiB per 100 M input voxels (least squares)")
    if not args.no_network:
        print("network", run("--part", "network"))


if __name__ == "__main__":
    main()
