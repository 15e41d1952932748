"""``make demo``: phantom data -> pretrain bundle (train, evaluate, infer) -> the per-task Dice table."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.bundle import ConfigWorkflow

from uniseg_monai.data.phantoms import generate_phantoms
from uniseg_monai.tasks import load_model_tasks


def _workflow(bundle: Path, kind: str, configs: list[str], **override) -> ConfigWorkflow:
    wf = ConfigWorkflow(
        config_file=[str(bundle / "configs" / f"{c}.json") for c in configs],
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"),
        workflow_type=kind,
        bundle_root=str(bundle),
        **override,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def _same_volume_two_tasks(datalist: Path, run: Path, per_case: Path) -> list[str]:
    """Lines showing one test CT volume segmented as two tasks (voxel counts per label, the case's Dice)."""
    registry = load_model_tasks(run / "models")
    items = json.loads(datalist.read_text())["testing"]
    by_image: dict[str, list[str]] = {}
    for item in items:
        if isinstance(item["image"], str):
            by_image.setdefault(item["image"], []).append(item["task"])
    image, tasks = next((i, t) for i, t in by_image.items() if len(t) > 1)
    stem = Path(image).name.removesuffix(".nii.gz")
    dice: dict[tuple[str, str], str] = {}
    with per_case.open() as f:
        for row in csv.DictReader(f):
            if row["case"] == stem:
                dice[(row["task"], row["class"])] = row["dice"]
    lines = [f"The same CT volume ({image}) segmented under {len(tasks)} tasks:"]
    for task in tasks:
        pred = np.asarray(nib.load(run / "predictions" / f"{stem}_{task}_seg.nii.gz").dataobj)
        labels = registry[task].labels
        parts = [
            f"{labels[k]}: {int((pred == k).sum())} voxels (Dice {dice.get((task, labels[k]), 'n/a')})"
            for k in range(1, len(labels))
        ]
        lines.append(f"  {task:<10} -> " + ", ".join(parts))
    return lines


def run_demo(out: str = "demo_output", bundle: str = "bundles/uniseg_pretrain") -> Path:
    """Generate the phantoms, train the pretrain bundle with ``configs/demo.json``, evaluate and segment the
    test cases, print the results; returns the ``summary.json`` path. A finished training run is reused."""
    out_dir, bundle_dir = Path(out).resolve(), Path(bundle).resolve()
    datalist = out_dir / "data" / "datalist.json"
    if not datalist.exists():
        generate_phantoms(datalist.parent)
    run = out_dir / "pretrain"
    dirs = {"dataset_dir": str(datalist.parent), "ckpt_dir": str(run / "models")}
    start = time.perf_counter()
    if (run / "models" / "model.pt").exists():
        print(f"reusing the trained model in {run / 'models'} (delete {run} to train again)")
    else:
        _workflow(bundle_dir, "train", ["train", "demo"], **dirs, output_dir=str(run / "logs"))
    trained = time.perf_counter()
    _workflow(
        bundle_dir, "eval", ["train", "demo", "evaluate"], **dirs, output_dir=str(run), evaluate_section="testing"
    )
    _workflow(bundle_dir, "infer", ["inference", "demo"], **dirs, output_dir=str(run))
    done = time.perf_counter()

    print(f"\n=== UniSeg demo: {len(json.loads(datalist.read_text())['testing'])} test cases of the phantom tasks ===")
    print((run / "summary.md").read_text())
    print("\n".join(_same_volume_two_tasks(datalist, run, run / "per_case.csv")))
    print(f"\ntraining {trained - start:.0f} s, evaluation + inference {done - trained:.0f} s")
    print(f"predictions:  {run / 'predictions'}")
    print(f"TensorBoard:  tensorboard --logdir {run / 'logs'}")
    print(f"summary.json: {run / 'summary.json'}")
    return run / "summary.json"
