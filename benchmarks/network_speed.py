"""Training-step time of UniSeg eager vs ``torch.compile``, and vs MONAI's ``DynUNet`` of the same layout (kernels,
strides, filters, instance norm, LeakyReLU, deep supervision), as ratios measured side by side in one run: each
round runs every network once (order rotated per round), a ratio is taken per round and the median printed, so
drifting machine load cancels out.

A step: forward in training mode (every deep-supervision output), a loss touching every output, backward, SGD
(Nesterov, momentum 0.99). DynUNet upsamples its deep-supervision heads to full resolution inside its forward (its
design); UniSeg returns each at its own resolution. The first step of the compiled network includes compilation.

    python benchmarks/network_speed.py                      # tiny (CPU, ~2 min): the demo's 4 stages, patch 32x32x16
    python benchmarks/network_speed.py --paper --patch 96 96 32 --rounds 11
    python benchmarks/network_speed.py --paper --device cuda --patch 192 192 64 --amp bfloat16
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from monai.networks.nets import DynUNet

from uniseg_monai.engine.precision import AMP_DTYPES
from uniseg_monai.networks import UniSeg, compiled
from uniseg_monai.networks.uniseg import PAPER_FEATURES, PAPER_KERNEL_SIZES, PAPER_STRIDES

TINY = {
    "features": (8, 16, 32, 64),
    "kernel_sizes": ((3, 3, 1), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
    "strides": ((1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2)),
}  # the demo's network (bundles/uniseg_pretrain/configs/demo.json)
PAPER = {"features": PAPER_FEATURES, "kernel_sizes": PAPER_KERNEL_SIZES, "strides": PAPER_STRIDES}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def dynunet(layout: dict, num_classes: int) -> DynUNet:
    """MONAI's DynUNet with UniSeg's layout: same kernels, strides, filters and number of deep-supervision outputs."""
    return DynUNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=num_classes,
        kernel_size=layout["kernel_sizes"],
        strides=layout["strides"],
        upsample_kernel_size=layout["strides"][1:],
        filters=layout["features"],
        norm_name=("INSTANCE", {"affine": True}),
        act_name=("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
        deep_supervision=True,
        deep_supr_num=len(layout["features"]) - 2,
    )


def training_step(net: torch.nn.Module, inputs: tuple, amp: str) -> Callable[[], None]:
    """One SGD step of ``net(*inputs)`` in training mode; autocast to ``amp`` ('none', 'bfloat16', 'float16',
    the last with a ``GradScaler``)."""
    device = inputs[0].device
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.99, nesterov=True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "float16")

    def step() -> None:
        net.train()
        with torch.autocast(device.type, dtype=AMP_DTYPES.get(amp), enabled=amp != "none"):
            out = net(*inputs)
            outs = out.unbind(1) if isinstance(out, torch.Tensor) else out  # DynUNet stacks its heads
            loss = sum(o.float().square().mean() for o in outs)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def timed(step: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def side_by_side(steps: dict[str, Callable[[], None]], device: torch.device, rounds: int) -> dict[str, dict]:
    """Per network: first step (s), peak device memory of a step (bytes, CUDA only) and the step times of
    ``rounds`` rounds in which every network runs once, the order rotated each round."""
    results = {name: {"first": timed(step, device), "times": []} for name, step in steps.items()}
    for name, step in steps.items():  # a second warm-up step (allocator, cuDNN choices), measuring its memory
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timed(step, device)
        results[name]["peak"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    names = list(steps)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            results[name]["times"].append(timed(steps[name], device))
    return results


def median_ratio(results: dict[str, dict], a: str, b: str) -> float:
    """Median over rounds of time(a) / time(b)."""
    return statistics.median(x / y for x, y in zip(results[a]["times"], results[b]["times"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper", action="store_true", help="the paper's network (32-320 channels, 6 stages)")
    parser.add_argument("--patch", type=int, nargs=3, default=None, help="(x, y, z); tiny 32 32 16, paper 96 96 32")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--amp", choices=["none", *AMP_DTYPES], default="none")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    layout, device = (PAPER if args.paper else TINY), torch.device(args.device)
    patch = args.patch or ((96, 96, 32) if args.paper else (32, 32, 16))
    torch.manual_seed(0)
    uniseg = UniSeg(num_tasks=11, num_classes=4, patch_size=patch, **layout).to(device)
    reference = dynunet(layout, 4).to(device)
    x = torch.randn(args.batch, 1, *patch, device=device)
    task_ids = torch.zeros(args.batch, dtype=torch.long, device=device)
    steps = {
        "UniSeg eager": training_step(uniseg, (x, task_ids), args.amp),
        "UniSeg compiled": training_step(compiled(copy.deepcopy(uniseg), True), (x, task_ids), args.amp),
        "DynUNet eager": training_step(reference, (x,), args.amp),
    }
    name = "paper" if args.paper else "tiny"
    print(f"torch {torch.__version__} on {device} ({torch.get_num_threads()} threads), {name} layout "
          f"{list(layout['features'])}, batch {args.batch}, patch {list(patch)}, amp {args.amp}")  # fmt: skip
    results = side_by_side(steps, device, args.rounds)
    params = {"UniSeg eager": count(uniseg), "UniSeg compiled": count(uniseg), "DynUNet eager": count(reference)}
    print(f"\n{'training step':<18}{'parameters':>12}{'first step s':>14}{'median s':>10}{'peak GiB':>10}")
    for name, r in results.items():
        peak = f"{r['peak'] / 2**30:10.2f}" if r["peak"] is not None else f"{'-':>10}"
        print(f"{name:<18}{params[name]:>12,}{r['first']:>14.2f}{statistics.median(r['times']):>10.3f}{peak}")
    print(f"\nmedian of {args.rounds} per-round ratios (alternating):")
    print(f"  compiled / eager (UniSeg)   {median_ratio(results, 'UniSeg compiled', 'UniSeg eager'):.2f}")
    print(f"  UniSeg / DynUNet (eager)    {median_ratio(results, 'UniSeg eager', 'DynUNet eager'):.2f}")


if __name__ == "__main__":
    main()
