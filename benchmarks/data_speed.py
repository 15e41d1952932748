"""Pre-processing and augmentation throughput (samples/s, one worker) on the phantom data set.

Run: ``python benchmarks/data_speed.py`` (generates phantoms in a temporary folder). Prints the
deterministic part (load, orientation, spacing, normalisation) and the random part (crop + moreDA) side
by side, per task, in one run.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from monai.transforms import Compose

from uniseg_monai.apps.bundles import bundle_transforms
from uniseg_monai.data import load_items
from uniseg_monai.data.phantoms import generate_phantoms
from uniseg_monai.engine.wiring import registry_for_datalist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patch", type=int, nargs=3, default=(64, 64, 32))
    parser.add_argument("--augment-repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        datalist = generate_phantoms(tmp)
        registry = registry_for_datalist(datalist)
        pre = Compose(bundle_transforms(registry, "train#deterministic_transforms"))
        random = ("train#sampling_transforms", "augmentation_transforms")
        aug = Compose(bundle_transforms(registry, *random, patch_size=list(args.patch))[1:])  # no cached indices
        aug.set_random_state(0)
        items = load_items(datalist, "training", registry)
        print(f"{'task':<10}{'cases':>6}{'preprocess/s':>14}{'augment/s':>11}{'ratio':>7}")
        for task in registry:
            cases = [i for i in items if i["task"] == task]
            t0 = time.perf_counter()
            done = [pre(i) for i in cases]
            pre_rate = len(cases) / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _ in range(args.augment_repeats):
                for d in done:
                    aug(d)
            aug_rate = args.augment_repeats * len(done) / (time.perf_counter() - t0)
            print(f"{task:<10}{len(cases):>6}{pre_rate:>14.1f}{aug_rate:>11.1f}{aug_rate / pre_rate:>7.1f}")
    print(f"patch {tuple(args.patch)} (x, y, z), 1 thread, torch {torch.__version__}")


if __name__ == "__main__":
    main()
