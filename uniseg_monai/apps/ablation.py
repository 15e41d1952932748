"""``uniseg ablate``: the paper's ablations and universal baselines trained side by side on the phantoms, with the
experiment that shows the prompt matters (``ph_organs`` and ``ph_liver`` share CT volumes; label 2 is the spleen in
one and the liver tumour in the other, so a network that is not told the task cannot be right on both)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from uniseg_monai.apps.bundles import DEFAULT_BUNDLE, find_bundle, run_workflow
from uniseg_monai.core.errors import UsageError
from uniseg_monai.core.run_folder import latest_checkpoint
from uniseg_monai.data.phantoms import generate_phantoms
from uniseg_monai.model_io.model_files import network_from_file

VARIANTS = ("uniseg", "fixed_prompt", "multiple_prompts", "uniseg_t", "dodnet", "task_blind")  # the default table
SHARED = ("ph_organs", "ph_liver")  # the two tasks on the same CT volumes; label 2 differs
SETTINGS = (
    "demo network and optimiser (configs/demo.json: AdamW lr 3e-3, constant for half the epochs then poly decay, "
    "batch 2, patch 32x32x16, crop only)"
)


def variant_configs(bundle: Path) -> list[str]:
    """The variant overlays of ``bundle`` (``configs/variants/<name>.json``) and ``uniseg`` (the paper's network)."""
    return ["uniseg", *sorted(p.stem for p in (bundle / "configs" / "variants").glob("*.json"))]


def shared_volumes(datalist: Path) -> list[dict[str, Path]]:
    """The test volumes segmented as both :data:`SHARED` tasks: per volume its image path and each task's label
    file (absolute paths)."""
    root = datalist.parent
    labels: dict[str, dict[str, Path]] = {}
    for item in json.loads(datalist.read_text())["testing"]:
        if item["task"] in SHARED and isinstance(item["image"], str):
            labels.setdefault(item["image"], {})[item["task"]] = root / item["label"]
    return [{"image": root / image, **tasks} for image, tasks in sorted(labels.items()) if len(tasks) == len(SHARED)]


def _maps(predictions: Path, image: Path) -> list[np.ndarray]:
    """The saved :data:`SHARED` task maps of ``image`` (input grid), in :data:`SHARED` order."""
    stem = image.name.removesuffix(".nii.gz")
    return [np.asarray(nib.load(predictions / f"{stem}_{task}_seg.nii.gz").dataobj) for task in SHARED]


def prompt_effect(predictions: Path, datalist: Path) -> int:
    """Voxels that differ between the ``ph_organs`` and ``ph_liver`` maps of the shared test volumes."""
    return sum(int((a != b).sum()) for a, b in (_maps(predictions, v["image"]) for v in shared_volumes(datalist)))


def wrong_task_rates(predictions: Path, datalist: Path) -> dict[str, float]:
    """How often the network answers the other task on the shared test volumes, where label 2 is the spleen under
    ``ph_organs`` and the liver tumour under ``ph_liver``: ``tumour_as_spleen`` = fraction of the tumour voxels
    labelled 2 under ``ph_organs``, ``spleen_as_tumour`` = fraction of the spleen voxels labelled 2 under
    ``ph_liver``. 0 for a network that follows its prompt, ~1 for one that answers one task whatever it is asked."""
    hits, totals = np.zeros(2), np.zeros(2)
    for volume in shared_volumes(datalist):
        organs_map, liver_map = _maps(predictions, volume["image"])
        spleen = np.asarray(nib.load(volume[SHARED[0]]).dataobj) == 2
        tumour = np.asarray(nib.load(volume[SHARED[1]]).dataobj) == 2
        hits += [(organs_map[tumour] == 2).sum(), (liver_map[spleen] == 2).sum()]
        totals += [tumour.sum(), spleen.sum()]
    rates = hits / np.maximum(totals, 1)
    return {"tumour_as_spleen": float(rates[0]), "spleen_as_tumour": float(rates[1])}


def _parameters(run: Path) -> int:
    """Learned parameters of the run's network (buffers such as a fixed prompt or an embedding table excluded)."""
    network, _ = network_from_file(run / "models" / "model.pt")
    return sum(p.numel() for p in network.parameters())


def run_variant(bundle: Path, name: str, datalist: Path, out: Path, epochs: int, iterations: int, extra: dict) -> dict:
    """Train and evaluate one variant (``uniseg`` = the paper's network) on the phantoms; its table row."""
    configs = ["train", "demo"] + ([] if name == "uniseg" else [f"variants/{name}"])
    run = out / name
    ids = {"dataset_dir": str(datalist.parent), "ckpt_dir": str(run / "models"), **extra}
    timing = run / "train_seconds.json"
    if not (run / "models" / "model.pt").exists():  # an interrupted run continues exactly where it stopped
        tic = time.perf_counter()
        budget = {"epochs": epochs, "iterations_per_epoch": iterations, "val_interval": epochs}
        resume = latest_checkpoint(run / "models") is not None
        run_workflow(bundle, "train", configs, **ids, **budget, resume=resume, output_dir=str(run / "logs"))
        timing.write_text(json.dumps(time.perf_counter() - tic))
    seconds = json.loads(timing.read_text()) if timing.exists() else float("nan")
    run_workflow(bundle, "eval", [*configs, "evaluate"], **ids, output_dir=str(run), evaluate_section="testing",
              save_predictions=True, write_report=False, overwrite=True)  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    tasks = summary["tasks"]
    return {
        "variant": name,
        "parameters": _parameters(run),
        "dice": {t: tasks[t]["dice"] for t in tasks},
        "mean_dice": summary["mean_dice"],
        "label_2": {t: tasks[t]["per_class"][list(tasks[t]["per_class"])[1]] for t in SHARED if t in tasks},
        "prompt_effect_voxels": prompt_effect(run / "predictions", datalist),
        "train_seconds": round(seconds, 1),
    }


def table(rows: Sequence[dict], epochs: int, iterations: int) -> str:
    """The rows as Markdown: per-task Dice (%), mean, label-2 Dice of the shared tasks, prompt effect, time."""
    tasks = list(rows[0]["dice"])
    head = ["variant", "parameters", *tasks, "mean", "spleen (ph_organs 2)", "tumour (ph_liver 2)",
            "prompt effect (voxels)", "train (s)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], f"{r['parameters']:,}", *(f"{100 * r['dice'][t]:.1f}" for t in tasks),
                 f"{100 * r['mean_dice']:.1f}", *(f"{100 * r['label_2'].get(t, float('nan')):.1f}" for t in SHARED),
                 f"{r['prompt_effect_voxels']:,}", f"{r['train_seconds']:.0f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    budget = f"{epochs * iterations:,} iterations ({epochs} epochs x {iterations}), seed 0, {SETTINGS}"
    return "\n".join([*lines, "", f"Same budget for every run: {budget}; test cases of the phantom tasks."])


def ablate(
    out: str | Path,
    variants: Sequence[str] = VARIANTS,
    epochs: int = 30,
    iterations: int = 40,
    bundle: str | Path = DEFAULT_BUNDLE,
    **ids: object,
) -> Path:
    """Train each variant with the same budget and seed on the phantoms (generated into ``OUT/data`` once) and write
    ``OUT/ablation.md`` / ``.json``; finished runs are reused. ``bundle``: a folder or name
    (:func:`~uniseg_monai.apps.bundles.find_bundle`). Returns the Markdown file."""
    bundle, out = find_bundle(bundle).resolve(), Path(out).resolve()
    known = variant_configs(bundle)
    unknown = [v for v in variants if v not in known]
    if unknown:
        raise UsageError(f"unknown variant(s) {unknown}; choose from {known}")
    if epochs < 1 or iterations < 1:
        raise UsageError(f"--epochs and --iterations must be >= 1, got {epochs} and {iterations}")
    datalist = out / "data" / "datalist.json"
    if not datalist.exists():
        generate_phantoms(datalist.parent)
    rows = [
        run_variant(bundle, v, datalist, out, epochs, iterations, dict(ids))
        for v in tqdm(list(variants), desc="uniseg ablate", unit="variant")
    ]
    (out / "ablation.json").write_text(json.dumps(rows, indent=2) + "\n")
    text = table(rows, epochs, iterations)
    (out / "ablation.md").write_text(text + "\n")
    print(text)
    return out / "ablation.md"
