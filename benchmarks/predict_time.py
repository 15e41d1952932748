"""End-to-end time of ``uniseg predict`` on one CT with the paper-size network (random weights, the paper's 11 tasks,
window 192x192x64), split as its sidecar reports it: load (read and checks), preprocess (reorientation,
resampling to the task spacing, normalisation), inference (sliding window), postprocess (softmax, inverse
resampling, argmax), write (compressing the map), their sum (case), and the command's own wall time: each run is a
fresh ``python -m uniseg_monai predict`` process, so that includes its start, imports and model loading. Prints the
share of each that is not inference.

    python benchmarks/predict_time.py                              # real abdominal CT, task liver, TTA off and on
    python benchmarks/predict_time.py --tta off --device cuda
    python benchmarks/predict_time.py --image scan.nii.gz --task pancreas --threads 4
    python benchmarks/predict_time.py --image big_ct.nii.gz --tta off --base 1    # inference nearly free

Run it from another folder with PYTHONPATH=<checkout> to time another checkout (``python -m`` puts the current
folder first on the path).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL_CT = ROOT.parent / "shared" / "data" / "real_samples" / "totalseg_examples" / "ct_abdomen_3mm.nii.gz"
STEPS = ("load", "preprocess", "inference", "postprocess", "write")


def paper_model(path: Path, base: int) -> None:
    """A model file of the paper's network (11 tasks, window 192x192x64; width ``base``, 32 in the paper) with random
    weights."""
    import torch

    from uniseg_monai.model_io.model_files import save_model
    from uniseg_monai.networks import UniSeg, nnunet_features
    from uniseg_monai.tasks import PAPER_UPSTREAM_TASKS, TaskRegistry

    torch.manual_seed(0)
    tasks = TaskRegistry().subset(PAPER_UPSTREAM_TASKS)
    classes = max(t.num_classes for t in tasks.values())
    network = UniSeg(num_tasks=len(tasks), num_classes=classes, features=nnunet_features(base))
    save_model(path, network.state_dict(), network.network_def(), tasks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, default=REAL_CT, help="a CT (default: ../shared's abdominal CT)")
    parser.add_argument("--task", default="liver")
    parser.add_argument("--tta", choices=["off", "on", "both"], default="both")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--base", type=int, default=32, help="network width (32 = paper; 1: what is not inference)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)), help="CPU threads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model.pt"
        paper_model(model, args.base)
        print(f"{args.image.name}, task {args.task}, paper network (base {args.base}) on {args.device}, "
              f"{args.threads} thread(s)")  # fmt: skip
        print(f"{'TTA':4s} " + " ".join(f"{s:>11s}" for s in STEPS) + f" {'case':>9s} {'command':>9s}  non-inference")
        for tta in ("off", "on") if args.tta == "both" else (args.tta,):
            out = Path(tmp) / f"out_{tta}"
            command = [sys.executable, "-m", "uniseg_monai", "predict", "-i", str(args.image), "-o", str(out)]
            command += ["--task", args.task, "--checkpoint", str(model), "--device", args.device]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            start = time.perf_counter()
            subprocess.run(command + (["--tta"] if tta == "on" else []), check=True, env=env, capture_output=True)
            wall = time.perf_counter() - start
            stem = args.image.name.removesuffix(".gz").removesuffix(".nii")
            times = json.loads((out / f"{stem}_{args.task}.json").read_text())["timings_s"]
            case, inference = sum(times.values()), times["inference"]
            shares = f"{1 - inference / case:.0%} of the case, {1 - inference / wall:.0%} of the command"
            print(f"{tta:4s} " + " ".join(f"{times.get(s, float('nan')):10.2f}s" for s in STEPS)
                  + f" {case:8.1f}s {wall:8.1f}s  {shares}")  # fmt: skip


if __name__ == "__main__":
    main()
