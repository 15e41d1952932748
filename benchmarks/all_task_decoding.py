"""Memory and time of all-task decoding in one window, side by side in one run (each in its own subprocess, peak
RSS from ``wait4``): ``UniSeg.forward_tasks`` (encoder and FUSE once, the decoder once per task, one task after
the other) against the same decoder run on all tasks as one batch (the batch repeated per task: the alternative,
written out here only), paper network, window 192x192x64, float32, no gradients, CPU.

    python benchmarks/all_task_decoding.py            # 7 tasks: the abdominal CT group of `uniseg predict --task all`
    python benchmarks/all_task_decoding.py --tasks 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def run(mode: str, tasks: int) -> None:
    import torch

    from uniseg_monai.networks import UniSeg

    torch.manual_seed(0)
    net = UniSeg().eval()
    x = torch.randn(1, 1, 192, 192, 64)
    ids = list(range(tasks))
    with torch.no_grad():
        tic = time.perf_counter()
        if mode == "per task":
            out = net.forward_tasks(x, ids)
        else:  # batched: the batch repeated per task through the decoder
            skips, z = net.encode(x)
            prompts = net.task_prompts(z)[:, ids].reshape(tasks, 1, *z.shape[2:])
            out = net.decode(torch.cat([z.repeat(tasks, 1, 1, 1, 1), prompts], 1),
                             [s.repeat(tasks, 1, 1, 1, 1) for s in skips], all_heads=False)[0]  # fmt: skip
        seconds = time.perf_counter() - tic
    print(json.dumps({"seconds": seconds, "shape": list(out.shape)}))


def measure(mode: str, tasks: int) -> dict:
    process = subprocess.Popen(
        [sys.executable, __file__, "--mode", mode, "--tasks", str(tasks)], stdout=subprocess.PIPE
    )
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{mode} failed")
    return {**json.loads(process.stdout.read()), "peak_gib": usage.ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=7)
    parser.add_argument("--mode", choices=["per task", "batched"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        run(args.mode, args.tasks)
        return
    ours, batched = measure("per task", args.tasks), measure("batched", args.tasks)
    print(f"{args.tasks} tasks, one 192x192x64 window, paper network, CPU")
    print(f"decoder per task (forward_tasks): {ours['seconds']:.1f} s, peak {ours['peak_gib']:.2f} GiB")
    print(f"decoder batched over tasks:       {batched['seconds']:.1f} s, peak {batched['peak_gib']:.2f} GiB")
    ratios = ours["seconds"] / batched["seconds"], ours["peak_gib"] / batched["peak_gib"]
    print("ratio per-task / batched: time {:.2f}, peak memory {:.2f}".format(*ratios))


if __name__ == "__main__":
    main()
