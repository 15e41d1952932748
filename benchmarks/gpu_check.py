"""The GPU check: one table of what this project's first GPU gives, with the published reference points beside it.

Rows: the paper network's training step (Dice+CE with deep supervision on the paper's 11 tasks, SGD with Nesterov,
gradient clipping 12; batch 2 x 192x192x64 (x, y, z), the paper's 64x192x192) in float32, AMP bfloat16 and AMP
bfloat16 + ``torch.compile`` (``uniseg_monai.networks.compiled``, as the bundles' ``compile`` id), and on CUDA AMP
bfloat16 with ``cudnn.benchmark`` (which nnU-Net v2 sets and the bundles leave off), each with its peak GPU memory
(allocated; reserved = the caching allocator's share, what ``nvidia-smi`` shows less the context); all-task vs
per-task inference of one window (``benchmarks/all_task_speed.py``); and ``uniseg predict --device cuda`` of one real
CT (a random-weight model file of the paper network; the time does not depend on the weights) with the split its
sidecar records.

    benchmarks/gpu_check.sh benchmarks/data/ct.nii.gz        # on the GPU machine: installs the wheels, then this
    python benchmarks/gpu_check.py --cpu --tiny CT.nii.gz    # the CPU path CI runs (tests/test_benchmarks.py)

``--tiny``: the demo's network and patch (4 stages of 8-64 channels, 32x32x16), 3 steps. On the CPU the AMP rows
run in float32 (as the bundles, whose ``amp`` is off there: bfloat16 convolutions are ~25x slower on a CPU without
bfloat16 units) and the compile row traces with dynamo's ``eager`` backend (no C++ build), so CI checks every code
path in seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import monai
import torch
from all_task_speed import macs, seconds
from network_speed import PAPER, TINY, timed

from uniseg_monai.engine.losses import TaskDeepSupervisionLoss
from uniseg_monai.model_io.model_files import save_model
from uniseg_monai.networks import TaskLogits, UniSeg, compiled
from uniseg_monai.networks.uniseg import PAPER_PATCH_SIZE
from uniseg_monai.tasks import PAPER_UPSTREAM_TASKS, TaskRegistry

ROOT = Path(__file__).resolve().parents[1]
REFERENCES = {  # beside the row they compare with
    "AMP bf16": "memory: target <= 11 GB (official README: ~10 GB with fp16 AMP)",
    "AMP bf16 + compile": "official README ~0.38 s/it (RTX 2080 Ti, fp16 AMP); nnU-Net v1 3d_fullres ~0.17 s/it (A100)",
    "all-task": "target ratio <= 0.80",
}
MODES = {  # name: (autocast dtype or None, compile, cudnn.benchmark)
    "fp32": (None, False, False),
    "AMP bf16": (torch.bfloat16, False, False),
    "AMP bf16 + compile": (torch.bfloat16, True, False),
    "AMP bf16 + cudnn.benchmark": (torch.bfloat16, False, True),  # nnU-Net v2 sets it; the bundles do not
}


def network(registry: TaskRegistry, layout: dict, patch: tuple[int, ...], device: torch.device) -> UniSeg:
    torch.manual_seed(0)
    return UniSeg(num_tasks=registry.num_tasks, num_classes=registry.num_classes, patch_size=patch, **layout).to(device)


def training_step(net: UniSeg, registry: TaskRegistry, batch: int, dtype: torch.dtype | None):
    """The training algorithm of the bundles on a random batch of task 0 (liver), as one callable step."""
    device, patch = next(net.parameters()).device, net.init_args["patch_size"]
    x = torch.randn(batch, 1, *patch, device=device)
    label = torch.randint(0, registry.classes_per_task[0], (batch, 1, *patch), device=device).float()  # as EnsureTyped
    task_id = torch.zeros(batch, dtype=torch.long, device=device)
    loss_fn = TaskDeepSupervisionLoss(registry.classes_per_task)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)

    def step() -> None:
        net.train()
        opt.zero_grad(set_to_none=False)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(TaskLogits(net(x, task_id=task_id), task_id), label)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
        opt.step()

    return step


def step_row(args, registry: TaskRegistry, layout: dict, device: torch.device, mode: str) -> dict:
    """Seconds per step (median of ``args.steps`` after 2 warm-up steps), the first step and peak memory."""
    dtype, compile_it, benchmark = MODES[mode]
    dtype = dtype if device.type == "cuda" else None
    torch.backends.cudnn.benchmark = benchmark
    net = network(registry, layout, args.patch, device)
    if compile_it and device.type == "cuda":
        compiled(net, True)
    elif compile_it:
        net.compile(backend="eager")
    step = training_step(net, registry, args.batch, dtype)
    first = timed(step, device)
    timed(step, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [timed(step, device) for _ in range(args.steps)]
    row = {"s_it": statistics.median(times), "first": first}
    if device.type == "cuda":
        row["peak"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["reserved"] = torch.cuda.max_memory_reserved(device) / 2**30
    torch.backends.cudnn.benchmark = False
    del net, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def all_task_row(registry: TaskRegistry, layout: dict, patch, device: torch.device, repeats: int) -> dict:
    """One window, every task of the model: the per-task loop vs ``forward_tasks``, as ``uniseg predict`` runs them
    (AMP bfloat16 on CUDA), and the lowest ratio a shared-encoder scheme can reach."""
    net = network(registry, layout, patch, device).eval()
    window, ids = torch.randn(1, 1, *patch, device=device), list(range(registry.num_tasks))
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        counts = macs(net, window)
        runs = {"loop": lambda: [net(window, t) for t in ids], "all": lambda: net.forward_tasks(window, ids)}
        out = seconds(runs, device, repeats, lambda: net(window, 0))
    total, shared, t = sum(counts.values()), counts["encoder"] + counts["skips"], len(ids)
    bound = (shared + t * (total - shared)) / (t * total)  # sharing what forward_tasks shares
    return {"loop": out["loop"], "fused": out["all"], "ratio": out["ratio"], "bound": bound}


def predict_row(ct: Path, registry: TaskRegistry, layout: dict, patch, device: torch.device, work: Path) -> dict:
    """``uniseg predict`` of ``ct`` as the liver task, in a fresh process: its wall time and its sidecar's split."""
    net = network(registry, layout, patch, torch.device("cpu"))
    save_model(work / "model.pt", net.state_dict(), net.network_def(), registry)
    command = [sys.executable, "-m", "uniseg_monai", "predict", "-i", str(ct.resolve()), "-o", str(work / "out"),
               "--task", "liver", "--checkpoint", str(work / "model.pt"), "--bundle",
               str(ROOT / "bundles" / "uniseg_pretrain"), "--device", device.type,
               "--patch_size", json.dumps(list(patch))]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"uniseg predict failed ({done.returncode}): {done.stderr[-2000:]}")
    sidecar = json.loads(next((work / "out").glob("*_liver.json")).read_text())
    return {"wall": wall, "timings": sidecar["timings_s"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ct", type=Path, help="a real CT (NIfTI), e.g. a copy of ../shared/data/real_samples/...")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (CI)")
    parser.add_argument("--tiny", action="store_true", help="the demo's small network and patch, 3 steps")
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.cpu else "cuda")
    layout, args.patch = (TINY, (32, 32, 16)) if args.tiny else (PAPER, PAPER_PATCH_SIZE)
    args.steps = 3 if args.tiny else 10
    registry = TaskRegistry().subset(PAPER_UPSTREAM_TASKS)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"UniSeg GPU check: {name}, torch {torch.__version__}, MONAI {monai.__version__}; "
          f"{'tiny' if args.tiny else 'paper'} network, {registry.num_tasks} tasks, batch {args.batch} x "
          f"{'x'.join(map(str, args.patch))} (x, y, z)\n", flush=True)  # fmt: skip
    lines = ["| measurement | ours | reference |", "|---|---|---|"]
    for mode in [m for m in MODES if device.type == "cuda" or not MODES[m][2]]:  # cuDNN: CUDA only
        r = step_row(args, registry, layout, device, mode)
        memory = f", peak {r['peak']:.1f} GiB (reserved {r['reserved']:.1f})" if "peak" in r else ""
        lines.append(f"| training step, {mode} | {r['s_it']:.3f} s/it{memory} (first step {r['first']:.1f} s) | "
                     f"{REFERENCES.get(mode, '')} |")  # fmt: skip
        print(lines[-1], flush=True)
    a = all_task_row(registry, layout, args.patch, device, 1 if args.tiny else 3)
    lines.append(f"| one window, {registry.num_tasks} tasks: all-task vs per-task loop | {a['fused']:.3f} s vs "
                 f"{a['loop']:.3f} s, ratio {a['ratio']:.2f} (bound {a['bound']:.2f}) | "
                 f"{REFERENCES['all-task']} |")  # fmt: skip
    print(lines[-1], flush=True)
    with tempfile.TemporaryDirectory() as work:
        p = predict_row(args.ct, registry, layout, args.patch, device, Path(work))
    split = ", ".join(f"{k} {v:.1f}" for k, v in p["timings"].items())
    lines.append(f"| `uniseg predict --device {device.type}`, {args.ct.name}, liver | {p['wall']:.1f} s in all "
                 f"({split} s) | |")  # fmt: skip
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
