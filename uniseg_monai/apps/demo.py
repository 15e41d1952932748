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
from uniseg_monai.apps.transfer import RUNS, finetune_pair, headline, kidneys_datalist, pretrain, summarise
from uniseg_monai.core.errors import UniSegError
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


def _fine_tune(out_dir: Path, bundle: Path, pretrained: Path) -> tuple[dict[str, Path], str]:
    """:func:`~uniseg_monai.apps.transfer.kidneys_datalist`'s task fine-tuned with ``configs/demo.json`` from scratch
    and from ``pretrained`` at the same budget, seed 0, the two runs in parallel processes (``uniseg transfer``'s
    :func:`~uniseg_monai.apps.transfer.finetune_pair`); returns {run: per_class.csv} and the lines saying what they
    show (:func:`~uniseg_monai.apps.transfer.headline` and the validation curves)."""
    datalist = kidneys_datalist(out_dir)
    results, failed = finetune_pair(out_dir / "finetune", bundle, datalist, pretrained, layout="{out}/{folder}")
    if failed:
        (name, _), error = next(iter(failed.items()))
        raise UniSegError(f"fine-tuning {name} failed: {error} (see {out_dir / 'finetune'}/<run>/console.log)")
    rows = summarise(list(results.values()))
    lines = [headline(rows) + "."]
    for r in rows:
        points = " ".join(f"{p['mean']:.2f}" for p in r["curve"]["val_dice"])
        lines.append(f"  validation mean Dice of {r['run']} at iterations {r['curve']['iterations']}: {points}")
    reports = {name: out_dir / "finetune" / folder / "per_class.csv" for name, folder in RUNS.items()}
    return reports, "\n".join(lines)


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
    start = time.perf_counter()
    run = pretrain(out_dir, bundle_dir)
    dirs = {"dataset_dir": str(datalist.parent), "ckpt_dir": str(run / "models")}
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
    reports, shows = _fine_tune(out_dir, find_bundle(finetune_bundle).resolve(), run / "models" / "model.pt")
    tuned = time.perf_counter()

    print(f"\n=== UniSeg demo: {len(json.loads(datalist.read_text())['testing'])} test cases of the phantom tasks ===")
    print((run / "summary.md").read_text())
    print("\n".join(_same_volume_two_tasks(datalist, run, run / "per_case.csv")))
    print("\n=== Fine-tuning on a task unseen in pretraining (ph_kidneys: 2 kidneys + gallbladder, 4 classes) ===")
    print("=== with the BTCV bundle, same budget; test Dice (%) from scratch and from the pretrained model ===")
    print(_side_by_side(reports))
    print(shows)
    print(
        f"\npretraining {trained - start:.0f} s, evaluation + inference {done - trained:.0f} s, "
        f"fine-tuning (2 runs in parallel + evaluation) {tuned - done:.0f} s"
    )
    print(f"predictions:  {run / 'predictions'}")
    print(f"TensorBoard:  tensorboard --logdir {run / 'logs'}")
    print(f"summary.json: {run / 'summary.json'}")
    print(f"report:       {report}")
    print(f"fine-tuning:  {', '.join(str(p.parent / 'report.html') for p in reports.values())}")
    return run / "summary.json"
