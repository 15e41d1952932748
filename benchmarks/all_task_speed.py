"""All-task inference vs the official per-task loop, measured side by side in one run.

The official code segments T tasks with T complete passes; ``UniSeg.forward_tasks`` runs the encoder, FUSE and each
decoder stage's convolution of its skip once per window, the rest of the decoder once per task. Prints both times
and their ratio for one window and for one volume (sliding window, overlap 0.5), paper network (11 tasks, base 32)
unless told otherwise, and the lowest ratio a scheme can reach from its multiply-accumulates, shared part S and
per-task part D: (S + T D) / (T (S + D)), counted with forward hooks, for sharing the encoder and FUSE only and for
what ``forward_tasks`` shares. With ``--repeats`` the loop and the all-task pass alternate, and the ratio is the
median over the pairs (robust to a machine whose load drifts).

    python benchmarks/all_task_speed.py --no-volume                       # paper window 192x192x64 (CPU: ~5 min)
    python benchmarks/all_task_speed.py --window 96 96 32 --volume 192 192 32
    python benchmarks/all_task_speed.py --device cuda                     # window and volume 384x384x64
"""

from __future__ import annotations

import argparse
import statistics

import torch
from network_speed import timed

from uniseg_monai.engine.inferers import AllTaskSlidingWindowInferer, TaskSlidingWindowInferer
from uniseg_monai.networks import UniSeg


def macs(net: UniSeg, window: torch.Tensor) -> dict[str, float]:
    """Multiply-accumulates of one single-task forward: encoder + bottleneck + FUSE, the decoder stages' first
    convolutions of their skips (the second half of their input channels), the rest of the decoder and heads."""
    counts = {"encoder": 0.0, "skips": 0.0, "decoder": 0.0}
    hooks = []
    for name, module in net.named_modules():
        if isinstance(module, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
            part = "decoder" if name.startswith(("decoder", "heads")) else "encoder"
            skip = 0.5 if name.startswith("decoder") and name.endswith("blocks.0.conv") else 0.0

            def hook(m, inputs, output, part=part, skip=skip):  # weight[0]: (in, *k) for a conv, (out, *k) transposed
                voxels = output if isinstance(m, torch.nn.Conv3d) else inputs[0]
                total = voxels.numel() * m.weight[0].numel()
                counts["skips"] += skip * total
                counts[part] += (1 - skip) * total

            hooks.append(module.register_forward_hook(hook))
    net(window, 0)
    for h in hooks:
        h.remove()
    return counts


def seconds(runs: dict, device: torch.device, repeats: int, warm_up) -> dict[str, float]:
    """Median wall time of each of ``runs`` (name -> callable) after one call of ``warm_up``, the runs alternating
    (in reversed order every other round), and ``ratio``: the median over rounds of the last run's time over the
    first's."""

    warm_up()
    names, times = list(runs), {name: [] for name in runs}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            times[name].append(timed(runs[name], device))
    out = {name: statistics.median(t) for name, t in times.items()}
    out["ratio"] = statistics.median(b / a for a, b in zip(times[names[0]], times[names[-1]]))
    return out


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
        counts = macs(net, window)
        total, t = sum(counts.values()), args.tasks
        bounds = [(shared + t * (total - shared)) / (t * total) for shared in (counts["encoder"],
                  counts["encoder"] + counts["skips"])]  # fmt: skip
        print(f"MACs per task pass: encoder+FUSE {counts['encoder'] / 1e9:.1f} G, decoder skip convolutions "
              f"{counts['skips'] / 1e9:.1f} G, rest of the decoder and heads {counts['decoder'] / 1e9:.1f} G -> lowest "
              f"possible ratio for {t} tasks sharing the encoder+FUSE {bounds[0]:.2f}, also the skip convolutions "
              f"(forward_tasks) {bounds[1]:.2f}")  # fmt: skip
        runs = {"loop": lambda: [net(window, i) for i in ids], "all": lambda: net.forward_tasks(window, ids)}
        out = seconds(runs, device, args.repeats, lambda: net(window, 0))
        print(f"one window:  per-task loop {out['loop']:8.2f} s   all-task {out['all']:8.2f} s   "
              f"ratio {out['ratio']:.2f}")  # fmt: skip
        if args.no_volume:
            return
        common = {"roi_size": args.window, "classes_per_task": classes, "sw_device": device, "device": "cpu"}
        single = TaskSlidingWindowInferer(**common)
        joint = AllTaskSlidingWindowInferer(**common)
        runs = {"loop": lambda: [single(volume, net, task_id=i) for i in ids], "all": lambda: joint(volume, net, ids)}
        out = seconds(runs, device, args.repeats, lambda: single(volume, net, task_id=0))
        print(f"one volume {list(volume_size)}: per-task loop {out['loop']:8.2f} s   all-task {out['all']:8.2f} s   "
              f"ratio {out['ratio']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
