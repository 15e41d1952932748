"""All-task inference vs the official per-task loop, measured side by side in one run.

The official code segments T tasks with T complete passes; ``UniSeg.forward_tasks`` runs the encoder and FUSE once
per window and the decoder once per task (batched over tasks). Prints both times and their ratio for one window
and for one volume (sliding window, overlap 0.5), paper network (11 tasks, base 32) unless told otherwise.

    python benchmarks/all_task_speed.py                                   # paper window 192x192x64 (slow on CPU)
    python benchmarks/all_task_speed.py --window 96 96 32 --volume 192 192 64 --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch

from uniseg_monai.inferers import AllTaskSlidingWindowInferer, TaskSlidingWindowInferer
from uniseg_monai.networks import UniSeg


def seconds(run, device: torch.device, repeats: int) -> float:
    """Median wall time of ``run()`` after one warm-up call."""
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[repeats // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, nargs=3, default=(192, 192, 64), help="(x, y, z); the training patch")
    parser.add_argument("--volume", type=int, nargs=3, default=None, help="(x, y, z); default 2x the window in x, y")
    parser.add_argument("--tasks", type=int, default=11)
    parser.add_argument("--base", type=int, default=32, help="network width (32 = paper)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    features = [min(args.base * 2**s, 320) for s in range(6)]
    net = UniSeg(num_tasks=args.tasks, num_classes=4, patch_size=args.window, features=features).to(device).eval()
    ids = list(range(args.tasks))
    classes = [4] * args.tasks
    window = torch.randn(1, 1, *args.window, device=device)
    volume_size = args.volume or (2 * args.window[0], 2 * args.window[1], args.window[2])
    volume = torch.randn(1, 1, *volume_size)
    print(f"torch {torch.__version__} on {device}, {args.tasks} tasks, base {args.base}, window {list(args.window)}")

    with torch.no_grad():
        loop = seconds(lambda: [net(window, t) for t in ids], device, args.repeats)
        fused = seconds(lambda: net.forward_tasks(window, ids), device, args.repeats)
        print(f"one window:  per-task loop {loop:8.2f} s   all-task {fused:8.2f} s   ratio {fused / loop:.2f}")
        common = {"roi_size": args.window, "classes_per_task": classes, "sw_device": device, "device": "cpu"}
        single = TaskSlidingWindowInferer(**common)
        joint = AllTaskSlidingWindowInferer(**common)
        loop = seconds(lambda: [single(volume, net, task_id=t) for t in ids], device, args.repeats)
        fused = seconds(lambda: joint(volume, net, ids), device, args.repeats)
        print(f"one volume {list(volume_size)}: per-task loop {loop:8.2f} s   all-task {fused:8.2f} s   "
              f"ratio {fused / loop:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
