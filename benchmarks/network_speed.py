"""Parameter counts of the paper configuration and CPU forward/backward time at a small patch.

Prints UniSeg (prompt + FUSE) next to the downstream backbone measured in the same run, so the ratio
(the prompt's overhead) is comparable across machines. Run: ``make bench`` or
``python benchmarks/network_speed.py --patch 96 96 32 --repeats 3``.
"""

from __future__ import annotations

import argparse
import time

import torch

from uniseg_monai.networks import UniSeg, UniSegBackbone


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def step_seconds(net: torch.nn.Module, x: torch.Tensor, repeats: int, *task: int) -> tuple[float, float]:
    """Median forward (eval, no grad) and forward+backward+SGD (train, deep supervision) seconds."""
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    fwd, train = [], []
    for _ in range(repeats + 1):  # first round warms up
        net.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            net(x, *task)
        fwd.append(time.perf_counter() - t0)
        net.train()
        t0 = time.perf_counter()
        loss = sum(o.float().square().mean() for o in net(x, *task))
        opt.zero_grad()
        loss.backward()
        opt.step()
        train.append(time.perf_counter() - t0)
    return sorted(fwd[1:])[repeats // 2], sorted(train[1:])[repeats // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patch", type=int, nargs=3, default=(96, 96, 32), help="(x, y, z) window")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    uniseg, backbone = UniSeg(), UniSegBackbone(num_classes=4)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"UniSeg paper configuration: {count(uniseg):,} parameters")
    for name in ("encoder", "bottleneck", "fuse", "decoder", "heads"):
        print(f"  {name:<10} {count(getattr(uniseg, name)):>12,}")
    print(f"  {'prompt':<10} {uniseg.universal_prompt.numel():>12,}")
    print(f"Downstream backbone (14 classes): {count(UniSegBackbone(num_classes=14)):,} parameters")
    x = torch.randn(1, 1, *args.patch)
    u_fwd, u_train = step_seconds(uniseg, x, args.repeats, 0)
    b_fwd, b_train = step_seconds(backbone, x, args.repeats)
    print(f"\npatch {tuple(args.patch)} (x, y, z), batch 1, CPU, median of {args.repeats}:")
    print(f"{'':<22}{'forward s':>10}{'fwd+bwd+SGD s':>15}")
    print(f"{'UniSeg':<22}{u_fwd:>10.2f}{u_train:>15.2f}")
    print(f"{'backbone (no prompt)':<22}{b_fwd:>10.2f}{b_train:>15.2f}")
    print(f"{'ratio UniSeg/backbone':<22}{u_fwd / b_fwd:>10.2f}{u_train / b_train:>15.2f}")


if __name__ == "__main__":
    main()
