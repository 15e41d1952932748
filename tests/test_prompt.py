"""The task prompt works: on the phantoms whose ``ph_organs`` and ``ph_liver`` share CT volumes (label 2 is the
spleen in one task and the liver tumour in the other), UniSeg trained through the pretrain bundle labels each
structure 2 far more often under its own task than under the other one; the task-blind network trained the same way
cannot (its maps do not depend on the task: the difference is 0 by construction), nor can any network whose task id
stopped reaching the decoder."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from uniseg_monai.apps.ablation import SHARED, label_2_rates, wrong_task_rates
from uniseg_monai.apps.bundles import run_workflow
from uniseg_monai.engine.param_groups import parameter_groups
from uniseg_monai.networks import TaskBlindUniSeg, UniSeg

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "uniseg_pretrain"
# the demo overlay with a tiny network, a 10x larger learning rate held for 80 % of the run and crops centred on
# foreground: within 600 iterations UniSeg labels each structure 2 far more often under its own task than under the
# other, the task-blind answer ("label 2 = spleen or tumour", which every prompt-driven network learns first) gone for
# at least one of them (seeds 0, 1, 2: mean separation 0.55, 0.51, 0.91; README 'Development')
RECIPE = {"features": [4, 8, 16, 32], "epochs": 24, "iterations_per_epoch": 25, "val_interval": 24,
          "learning_rate": 0.01, "constant_lr_fraction": 0.8, "foreground_fraction": 1.0, "seed": 0}  # fmt: skip
SEPARATION = 0.3  # the least mean separation UniSeg must reach
# the task-blind network's separation is 0 at any budget (its maps do not depend on the task): a short run shows it
BLIND_BUDGET = {"epochs": 4, "val_interval": 4}


SMALL = {"num_tasks": 2, "num_classes": 3, "features": (4, 8, 16, 16), "kernel_sizes": [3] * 4, "strides": [1, 2, 2, 2]}


def test_prompt_weight_decay_puts_the_universal_prompt_and_fuse_in_their_own_group():
    net = UniSeg(**SMALL, patch_size=(32, 32, 16))
    assert parameter_groups(net, 3e-5, 3e-5) == [{"params": list(net.parameters())}]  # the paper's: as before
    rest, prompt = parameter_groups(net, 3e-5, 0.0)
    names = {id(p): k for k, p in net.named_parameters()}
    assert {names[id(p)].split(".")[0] for p in prompt["params"]} == {"universal_prompt", "fuse"}
    assert prompt["weight_decay"] == 0.0 and "weight_decay" not in rest
    assert len(rest["params"]) + len(prompt["params"]) == len(list(net.parameters()))
    blind = TaskBlindUniSeg(**SMALL)
    assert parameter_groups(blind, 3e-5, 0.0) == [{"params": list(blind.parameters())}]  # no prompt: one group
    optimizer = torch.optim.SGD([rest, prompt], lr=0.01, weight_decay=3e-5)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [3e-5, 0.0]


def shared_tasks_datalist(datalist: Path, out: Path) -> Path:
    """A copy of the phantom ``datalist`` with the :data:`SHARED` tasks alone (absolute image and label paths)."""
    data = json.loads(datalist.read_text())
    root = datalist.parent
    shared = {"tasks": {t: data["tasks"][t] for t in SHARED}}
    for section in ("training", "validation", "testing"):
        shared[section] = [
            {**item, "image": str(root / item["image"]), "label": str(root / item["label"])}
            for item in data[section]
            if item["task"] in SHARED
        ]
    out.mkdir(parents=True)
    (out / "datalist.json").write_text(json.dumps(shared))
    return out / "datalist.json"


def separation(datalist: Path, run: Path, variant: list[str], **budget: int) -> dict[str, float]:
    """Train the pretrain bundle's demo overlay (+ ``variant``) with :data:`RECIPE` (+ ``budget``), segment the test
    cases; per structure with label 2 (spleen, tumour) the fraction labelled 2 under its own task minus that under
    the other task (:func:`~uniseg_monai.apps.ablation.label_2_rates`), and their ``mean``."""
    ids = {"dataset_dir": str(datalist.parent), "ckpt_dir": str(run / "models"), **RECIPE, **budget}
    run_workflow(BUNDLE, "train", ["train", "demo", *variant], **ids, output_dir=str(run / "logs"))
    run_workflow(BUNDLE, "eval", ["train", "demo", *variant, "evaluate"], **ids, output_dir=str(run),
                 evaluate_section="testing", save_predictions=True, write_report=False)  # fmt: skip
    rates = label_2_rates(run / "predictions", datalist)
    found = {name: rates[name][own] - rates[name][other] for name, own, other in zip(rates, SHARED, SHARED[::-1])}
    return {**found, "mean": sum(found.values()) / len(found)}


@pytest.mark.integration
def test_the_prompt_makes_the_network_answer_the_task_it_is_asked(phantoms, tmp_path):
    datalist = shared_tasks_datalist(phantoms, tmp_path / "data")
    uniseg = separation(datalist, tmp_path / "uniseg", [])
    blind = separation(datalist, tmp_path / "task_blind", ["variants/task_blind"], **BLIND_BUDGET)
    print(f"separation: uniseg {uniseg}, task-blind {blind}")  # shown with pytest -s (README 'Development')
    assert uniseg["mean"] >= SEPARATION and abs(blind["mean"]) < 0.01, (uniseg, blind)


def test_label_2_rates_count_each_structure_under_each_task(tmp_path):
    """One shared volume of 4 voxels: spleen (label 2 of ph_organs) at 0-1, tumour (label 2 of ph_liver) at 2-3."""

    def save(name: str, values: list[int]) -> str:
        nib.save(nib.Nifti1Image(np.array(values, np.uint8).reshape(4, 1, 1), np.eye(4)), tmp_path / name)
        return name

    image = save("ct_000.nii.gz", [0, 0, 0, 0])
    labels = {"ph_organs": save("organs.nii.gz", [2, 2, 1, 1]), "ph_liver": save("liver.nii.gz", [0, 0, 2, 2])}
    (tmp_path / "predictions").mkdir()
    save("predictions/ct_000_ph_organs_seg.nii.gz", [2, 0, 2, 1])  # spleen half right, half the tumour as spleen
    save("predictions/ct_000_ph_liver_seg.nii.gz", [2, 2, 2, 0])  # the whole spleen as tumour, half the tumour right
    testing = [{"task": task, "image": image, "label": label} for task, label in labels.items()]
    (tmp_path / "datalist.json").write_text(json.dumps({"testing": testing}))
    rates = label_2_rates(tmp_path / "predictions", tmp_path / "datalist.json")
    assert rates == {"spleen": {"ph_organs": 0.5, "ph_liver": 1.0}, "tumour": {"ph_organs": 0.5, "ph_liver": 0.5}}
    assert wrong_task_rates(tmp_path / "predictions", tmp_path / "datalist.json") == {
        "tumour_as_spleen": 0.5,
        "spleen_as_tumour": 1.0,
    }
