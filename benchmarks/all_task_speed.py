"""All-task inference vs the official per-task loop, measured side by side in one run.

The official code segments T tasks with T complete passes; ``UniSeg.forward_tasks`` runs the encoder and FUSE once
per window and the decoder once per task (batched over tasks). Prints both times and their ratio for one window
and for one volume (sliding window, overlap 0.5), paper network (11 tasks, base 32) unless told otherwise, and
the lowest ratio any shared-encoder scheme can reach: (E + T D) / (T (E + D)) from the multiply-accumulates of
encoder + FUSE (E) and decoder + heads (D), counted with forward hooks.

    python benchmarks/all_task_speed.py --no-volume                       # paper window 192x192x64 (CPU: ~5 min)
    python benchmarks/all_task_speed.py --window 96 96 32 --volume 192 192 32
    python benchmarks/all_task_speed.py --device cuda                     # window and volume 384x384x64
"""

from __future__ import annotations

import argparse
import time

import torch

from uniseg_monai.inferers import AllTaskSlidingWindowInferer, TaskSlidingWindowInferer
from uniseg_monai.networks import UniSeg


def macs(net: UniSeg, window: torch.Tensor) -> tuple[int, int]:
    """Multiply-accumulates of one single-task forward: (encoder + bottleneck + FUSE, decoder + heads)."""
    counts = {"shared": 0, "decoder": 0}
    hooks = []
    for name, module in net.named_modules():
        if isinstance(module, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
            part = "decoder" if name.startswith(("decoder", "heads")) else "shared"

            def hook(m, inputs, output, part=part):  # weight[0]: (in, *k) for a conv, (out, *k) transposed
                voxels = output if isinstance(m, torch.nn.Conv3d) else inputs[0]
                counts[part] += voxels.numel() * m.weight[0].numel()

            hooks.append(module.register_forward_hook(hook))
    net(window, 0)
    for h in hooks:
        h.remove()
    return counts["shared"], counts["decoder"]


def seconds(run, device: torch.device, repeats: int, warm_up=None) -> float:
    """Median wall time of ``repeats`` calls of ``run()`` after one call of ``warm_up`` (default: ``run``)."""
    (warm_up or run)()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, nargs=3, default=(192, 192, 64), help="(x, y, z); the training patch")
    parser.add_argument("--volume", type=int, nargs=3, default=None, help="(x, y, z); default 2x the window in x, y")
    parser.add_argument("--tasks", type=int, default=11)
    parser.add_argument("--base", type=int, default=32, help="network width (32 = paper)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-volume", action="store_true", help="one window only (the volume takes ~T windows)")
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
        shared, decoder = macs(net, window)
        bound = (shared + args.tasks * decoder) / (args.tasks * (shared + decoder))
        print(f"MACs per task pass: encoder+FUSE {shared / 1e9:.1f} G, decoder+heads {decoder / 1e9:.1f} G "
              f"-> lowest possible ratio for {args.tasks} tasks {bound:.2f}")  # fmt: skip
        once = lambda: net(window, 0)  # noqa: E731
        loop = seconds(lambda: [net(window, t) for t in ids], device, args.repeats, once)
        fused = seconds(lambda: net.forward_tasks(window, ids), device, args.repeats, once)
        print(f"one window:  per-task loop {loop:8.2f} s   all-task {fused:8.2f} s   ratio {fused / loop:.2f}")
        if args.no_volume:
            return
        common = {"roi_size": args.window, "classes_per_task": classes, "sw_device": device, "device": "cpu"}
        single = TaskSlidingWindowInferer(**common)
        joint = AllTaskSlidingWindowInferer(**common)
        loop = seconds(lambda: [single(volume, net, task_id=t) for t in ids], device, args.repeats)
        fused = seconds(lambda: joint(volume, net, ids), device, args.repeats)
        print(f"one volume {list(volume_size)}: per-task loop {loop:8.2f} s   all-task {fused:8.2f} s   "
              f"ratio {fused / loop:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
