"""``make demo``: phantom data -> pretrain bundle (train, evaluate, infer) -> the per-task Dice table, then
fine-tuning on a phantom task unseen in pretraining, from scratch and from the pretrained model, side by side."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from uniseg_monai.apps.ablation import wrong_task_rates
from uniseg_monai.apps.bundles import DEFAULT_BUNDLE, FINETUNE_BUNDLES, find_bundle, run_workflow
from uniseg_monai.apps.report import write_report
from uniseg_monai.data.phantoms import DOWNSTREAM_TASKS, generate_downstream_phantoms, generate_phantoms
from uniseg_monai.data.prepare import prepare
from uniseg_monai.tasks import load_model_tasks


def _same_volume_two_tasks(datalist: Path, run: Path, per_case: Path) -> list[str]:
    """Lines showing one test CT volume segmented as two tasks (voxel counts per label, the case's Dice), and the
    wrong-task rates over all shared test volumes (:func:`~uniseg_monai.apps.ablation.wrong_task_rates`)."""
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
    maps = []
    for task in tasks:
        pred = np.asarray(nib.load(run / "predictions" / f"{stem}_{task}_seg.nii.gz").dataobj)
        maps.append(pred)
        labels = registry[task].labels
        parts = [
            f"{labels[k]}: {int((pred == k).sum())} voxels (Dice {dice.get((task, labels[k]), 'n/a')})"
            for k in range(1, len(labels))
        ]
        lines.append(f"  {task:<10} -> " + ", ".join(parts))
    differ = int(sum((m != maps[0]).sum() for m in maps[1:]))
    lines.append(f"  the task prompt alone changes {differ} voxels of this volume between the {len(tasks)} maps")
    rates = wrong_task_rates(run / "predictions", datalist)
    lines.append(
        f"  wrong-task rates on all shared test volumes: tumour labelled spleen under ph_organs "
        f"{rates['tumour_as_spleen']:.3f}, spleen labelled tumour under ph_liver {rates['spleen_as_tumour']:.3f}"
    )
    return lines


def kidneys_datalist(out_dir: Path) -> Path:
    """``<out_dir>/data_btcv/datalist.json``: task ``ph_kidneys`` (right / left kidney, gallbladder of BTCV-like
    phantoms: structures and a class count the pretraining never saw), generated once."""
    datalist = out_dir / "data_btcv" / "datalist.json"
    if not datalist.exists():
        raw = generate_downstream_phantoms(datalist.parent / "raw", "btcv", cases=10, seed=1, spacing=[2.0, 2.0, 4.0])
        prepare(raw, "ph_kidneys", datalist, fmt="btcv", val_fraction=0.125, test_fraction=0.2)
        data = json.loads(datalist.read_text())
        data["tasks"]["ph_kidneys"].update(DOWNSTREAM_TASKS["ph_kidneys"])
        datalist.write_text(json.dumps(data, indent=1))
    return datalist


def _fine_tune(out_dir: Path, bundle: Path, pretrained: Path) -> dict[str, Path]:
    """:func:`kidneys_datalist`'s task fine-tuned with ``configs/demo.json`` from scratch and from ``pretrained`` at
    the same budget; returns {run: per_class.csv}."""
    datalist = kidneys_datalist(out_dir)
    reports = {}
    for name, weights in (("from scratch", ""), ("fine-tuned", str(pretrained))):
        run = out_dir / "finetune" / name.replace(" ", "_").replace("-", "_")
        dirs = {"dataset_dir": str(datalist.parent), "ckpt_dir": str(run / "models"), "pretrained": weights}
        if not (run / "models" / "model.pt").exists():
            run_workflow(bundle, "train", ["train", "demo"], **dirs, output_dir=str(run / "logs"))
        run_workflow(
            bundle,
            "eval",
            ["train", "demo", "evaluate"],
            **dirs,
            output_dir=str(run),
            evaluate_section="testing",
            overwrite=True,  # the demo's own earlier results
        )
        reports[name] = run / "per_class.csv"
    return reports


def _side_by_side(reports: dict[str, Path]) -> str:
    """The Dice rows of several per_class.csv files as one Markdown table (classes as columns)."""
    rows = {}
    for name, path in reports.items():
        with path.open() as f:
            table = list(csv.reader(f))
        header = table[0][2:]
        rows[name] = next(r[2:] for r in table if r[1] == "Dice (%)")
    lines = ["| run | " + " | ".join(header) + " |", "|" + "---|" * (len(header) + 1)]
    return "\n".join(lines + [f"| {name} | " + " | ".join(values) + " |" for name, values in rows.items()])


def run_demo(
    out: str = "demo_output",
    bundle: str = DEFAULT_BUNDLE,
    finetune_bundle: str = FINETUNE_BUNDLES["btcv"],
) -> Path:
    """Generate the phantoms, train the pretrain bundle with ``configs/demo.json``, evaluate and segment the
    test cases, fine-tune ``finetune_bundle`` on an unseen phantom task from scratch and from the pretrained
    model; print the results; returns the pretraining's ``summary.json`` path. Finished training runs are reused.
    Bundles are folders or names (:func:`~uniseg_monai.apps.bundles.find_bundle`)."""
    out_dir, bundle_dir = Path(out).resolve(), find_bundle(bundle).resolve()
    datalist = out_dir / "data" / "datalist.json"
    if not datalist.exists():
        generate_phantoms(datalist.parent)
    run = out_dir / "pretrain"
    dirs = {"dataset_dir": str(datalist.parent), "ckpt_dir": str(run / "models")}
    start = time.perf_counter()
    if (run / "models" / "model.pt").exists():
        print(f"reusing the trained model in {run / 'models'} (delete {run} to train again)")
    else:
        run_workflow(bundle_dir, "train", ["train", "demo"], **dirs, output_dir=str(run / "logs"))
    trained = time.perf_counter()
    run_workflow(
        bundle_dir,
        "eval",
        ["train", "demo", "evaluate"],
        **dirs,
        output_dir=str(run),
        evaluate_section="testing",
        write_report=False,
        overwrite=True,  # the demo's own earlier results
    )
    run_workflow(bundle_dir, "infer", ["inference", "demo"], **dirs, output_dir=str(run), overwrite=True)
    report = write_report(run, datalist=datalist)
    done = time.perf_counter()
    reports = _fine_tune(out_dir, find_bundle(finetune_bundle).resolve(), run / "models" / "model.pt")
    tuned = time.perf_counter()

    print(f"\n=== UniSeg demo: {len(json.loads(datalist.read_text())['testing'])} test cases of the phantom tasks ===")
    print((run / "summary.md").read_text())
    print("\n".join(_same_volume_two_tasks(datalist, run, run / "per_case.csv")))
    print("\n=== Fine-tuning on a task unseen in pretraining (ph_kidneys: 2 kidneys + gallbladder, 4 classes) ===")
    print("=== with the BTCV bundle, same budget; test Dice (%) from scratch and from the pretrained model ===")
    print(_side_by_side(reports))
    print(
        f"\npretraining {trained - start:.0f} s, evaluation + inference {done - trained:.0f} s, "
        f"fine-tuning (2 runs + evaluation) {tuned - done:.0f} s"
    )
    print(f"predictions:  {run / 'predictions'}")
    print(f"TensorBoard:  tensorboard --logdir {run / 'logs'}")
    print(f"summary.json: {run / 'summary.json'}")
    print(f"report:       {report}")
    return run / "summary.json"
