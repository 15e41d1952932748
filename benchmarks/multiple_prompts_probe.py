"""Why Multiple Prompts sits at the task-blind floor in ``uniseg ablate`` (issue 27; README 'Ablations').

1. ``--ablation DIR`` (a finished ``uniseg ablate`` output): per seed, how far the trained prompt tensor of
   ``multiple_prompts`` and of ``uniseg`` moved from its initial value (rebuilt with the run's seed: the network is
   the first thing the bundle draws after ``set_determinism``), and the sign pattern of the ph_organs minus ph_liver
   prompt over the bottleneck positions (fraction positive: ~0.5 is a task code whose sign flips from one position to
   the next, unreadable for a convolutional decoder).
2. At initialisation, on one shared CT crop: the fraction of voxels whose argmax changes when the task id is switched,
   and |grad| / |w| of the prompt, FUSE, decoder and encoder after one cross-entropy step (all prompts designs).
3. ``--uniform_seed K --out RUN``: the diagnostic run, ``multiple_prompts`` at the ablation's budget with each task's
   prompt initialised to one N(0, 1) value repeated over the positions (not a bundle option; ~15 min on one thread).

    python benchmarks/multiple_prompts_probe.py --ablation /work/abl_out
    python benchmarks/multiple_prompts_probe.py --ablation /work/abl_out --uniform_seed 0 --out /tmp/mp_uniform
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from uniseg_monai.apps.ablation import run_variant
from uniseg_monai.apps.bundles import DEFAULT_BUNDLE, find_bundle
from uniseg_monai.model_io.model_files import network_from_file
from uniseg_monai.networks import UniSeg
from uniseg_monai.networks import uniseg as uniseg_module

DEMO = {"num_tasks": 4, "num_classes": 4, "patch_size": (32, 32, 16), "features": (8, 16, 32, 64),
        "kernel_sizes": ((3, 3, 1), 3, 3, 3), "strides": (1, (2, 2, 1), 2, 2)}  # fmt: skip


def trained_prompts(ablation: Path) -> None:
    """Part 1: drift and sign pattern of the trained prompt tensors, per seed."""
    for run in sorted((ablation / "multiple_prompts").glob("seed_*")):
        seed = int(run.name.removeprefix("seed_"))
        torch.manual_seed(seed)
        initial = UniSeg(prompt="multiple", **DEMO).universal_prompt.detach()
        for variant in ("multiple_prompts", "uniseg"):
            trained = network_from_file(ablation / variant / run.name / "models" / "model.pt")[0]
            p = trained.universal_prompt.detach()
            corr = torch.corrcoef(torch.stack([initial.flatten(), p.flatten()]))[0, 1].item()
            drift = ((p - initial).norm() / initial.norm()).item()
            before, after = ((t[0, 0] - t[0, 1] > 0).float().mean().item() for t in (initial, p))
            print(f"seed {seed} {variant:17s} drift {drift:.3f}, correlation with the initial value {corr:.3f}; "
                  f"ph_organs - ph_liver prompt positive at {before:.2f} -> {after:.2f} of the positions")  # fmt: skip


def at_initialisation(data: Path) -> None:
    """Part 2: task-switch effect and relative gradients of the untrained networks on one shared CT crop."""
    load = lambda name: np.asarray(nib.load(data / "abdomen" / f"abdomen_000_{name}.nii.gz").dataobj)  # noqa: E731
    ct, organs, liver = load("ct").astype(np.float32), load("organs"), load("liver")
    crop = tuple(slice(c // 2 - h, c // 2 + h) for c, h in zip(ct.shape, (16, 16, 8)))
    x = torch.from_numpy(np.clip(ct[crop], -200, 300) / 250.0)[None, None].repeat(2, 1, 1, 1, 1)
    y = torch.stack([torch.from_numpy(organs[crop].astype(np.int64)), torch.from_numpy(liver[crop].astype(np.int64))])
    for prompt in ("universal", "fixed", "multiple"):
        torch.manual_seed(0)
        net = UniSeg(prompt=prompt, **DEMO).eval()
        with torch.no_grad():
            changed = (net(x[:1], 0).argmax(1) != net(x[:1], 1).argmax(1)).float().mean().item()
        net.train()
        loss = sum(F.cross_entropy(o, F.interpolate(y[:, None].float(), o.shape[2:])[:, 0].long())
                   for o in net(x, torch.tensor([0, 1])))  # fmt: skip
        loss.backward()
        relative = {}
        for part in ("universal_prompt", "fuse.", "decoder.", "encoder."):
            found = [p for k, p in net.named_parameters() if k.startswith(part) and p.grad is not None]
            if found:
                g, w = (torch.stack([t.norm() for t in ts]).norm().item() for ts in ([p.grad for p in found], found))
                relative[part.rstrip(".")] = f"{g / w:.1e}"
        print(f"{prompt:9s} task switch changes {changed:.1%} of the argmax; |grad| / |w| {relative}")


def uniform_run(ablation: Path, seed: int, out: Path) -> None:
    """Part 3: ``multiple_prompts`` at the ablation's budget with position-constant initial prompts."""
    original = uniseg_module.UniSeg.__init__

    def patched(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.prompt == "multiple":
            with torch.no_grad():
                n = self.universal_prompt.shape[1]
                self.universal_prompt.copy_(torch.randn(1, n, 1, 1, 1).expand_as(self.universal_prompt))

    uniseg_module.UniSeg.__init__ = patched
    budget = json.loads((ablation / "multiple_prompts" / f"seed_{seed}" / "result.json").read_text())["budget"]
    bundle = find_bundle(DEFAULT_BUNDLE).resolve()
    result = run_variant(bundle, "multiple_prompts", seed, ablation / "data" / "datalist.json", out,
                         budget["epochs"], budget["iterations_per_epoch"], budget["curve_every"], {})  # fmt: skip
    keys = ("mean_dice", "tumour_dice", "prompt_effect_voxels", "tumour_as_spleen", "spleen_as_tumour", "curve")
    print(json.dumps({k: result[k] for k in keys}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ablation", type=Path, required=True, help="a finished `uniseg ablate --out` folder")
    parser.add_argument("--uniform_seed", type=int, help="also train the position-constant diagnostic run")
    parser.add_argument("--out", type=Path, help="its run folder (with --uniform_seed)")
    args = parser.parse_args()
    if args.uniform_seed is not None and args.out is None:
        parser.error("--uniform_seed needs --out (the diagnostic run's folder)")
    torch.set_num_threads(1)
    trained_prompts(args.ablation)
    at_initialisation(args.ablation / "data")
    if args.uniform_seed is not None:
        uniform_run(args.ablation, args.uniform_seed, args.out)


if __name__ == "__main__":
    main()
