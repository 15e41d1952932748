"""Peak memory of ``uniseg predict`` for a large CT at the paper window (192x192x64), measured in subprocesses.

Two numbers, because on a GPU they land on different devices (windows run on the GPU, the volume is stitched,
inverted and written on the CPU):

1. host: the whole ``uniseg predict`` of one case (load, resample, sliding window with stitching on the CPU,
   softmax, inverse resampling, argmax, write) with the paper window and a 1-channel-wide network, so the
   network's share is negligible and the rest is what the volume costs;
2. network: one paper-size window (base 32, 11 tasks) through the paper network without gradients; on a GPU with
   AMP (float16) expect about half.

    python benchmarks/predict_memory.py                            # 512x512x600 CT at 0.8x0.8x1.0 mm, task liver
    python benchmarks/predict_memory.py --shape 512 512 300 --spacing 0.8 0.8 2.0
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


def host(shape: list[int], spacing: list[float], folder: Path) -> None:
    import nibabel as nib
    import numpy as np
    import torch
    from monai.bundle import ConfigParser

    from uniseg_monai.predict import predict
    from uniseg_monai.tasks import TaskRegistry, save_model_tasks

    image = folder / "ct.nii.gz"
    ct = np.random.default_rng(0).normal(40, 100, shape).astype(np.int16)
    nib.save(nib.Nifti1Image(ct, np.diag([*spacing, 1.0])), image)
    del ct
    models = folder / "models"
    save_model_tasks(TaskRegistry().subset(["liver"]), models)
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser.update({"bundle_root": str(BUNDLE), "ckpt_dir": str(models), "base_features": 1})
    torch.save(parser.get_parsed_content("network_def").state_dict(), models / "model.pt")
    before = peak_gib()
    predict(str(image), str(folder / "out"), "liver", bundle=str(BUNDLE), checkpoint=str(models / "model.pt"),
            device="cpu", base_features=1)  # fmt: skip
    print(json.dumps({"host_peak_gib": round(peak_gib(), 2), "before_predict_gib": round(before, 2)}))


def network() -> None:
    import torch

    from uniseg_monai.networks import UniSeg

    net = UniSeg(num_tasks=11, num_classes=4, patch_size=(192, 192, 64), features=[32, 64, 128, 256, 320, 320])
    window = torch.randn(1, 1, 192, 192, 64)
    before = peak_gib()
    with torch.no_grad():
        net.eval()(window, 0)
    print(json.dumps({"network_window_gib": round(peak_gib() - before, 2)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 600], help="voxels (x, y, z)")
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 1.0], help="mm (x, y, z)")
    parser.add_argument("--part", choices=["host", "network"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part == "host":
        with tempfile.TemporaryDirectory() as tmp:
            host(args.shape, args.spacing, Path(tmp))
        return
    if args.part == "network":
        network()
        return
    size = [round(n * s / t) for n, s, t in zip(args.shape, args.spacing, (1.5, 1.5, 3.0))]
    print(f"CT {args.shape} at {args.spacing} mm -> {size} at the liver task's 1.5x1.5x3 mm; window 192x192x64")
    for part in ("host", "network"):
        common = ["--shape", *map(str, args.shape), "--spacing", *map(str, args.spacing), "--part", part]
        out = subprocess.run([sys.executable, __file__, *common], capture_output=True, text=True, check=True)
        print(part, out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
