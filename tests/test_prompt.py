"""The task prompt works: on the phantoms whose ``ph_organs`` and ``ph_liver`` share CT volumes (label 2 is the
spleen in one task and the liver tumour in the other), UniSeg trained through the pretrain bundle answers the task it
is asked far more often than the task-blind network trained the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from uniseg_monai.apps.ablation import SHARED, wrong_task_rates
from uniseg_monai.apps.bundles import run_workflow
from uniseg_monai.engine.param_groups import parameter_groups
from uniseg_monai.networks import TaskBlindUniSeg, UniSeg

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "uniseg_pretrain"
# a tiny network and the demo's optimiser and schedule: UniSeg separates the two tasks within this budget (seed fixed)
RECIPE = {"features": [4, 8, 16, 32], "epochs": 30, "iterations_per_epoch": 40, "val_interval": 30, "seed": 0}


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


def trained_rates(datalist: Path, run: Path, variant: list[str]) -> dict[str, float]:
    """Train the pretrain bundle's demo overlay (+ ``variant``) with :data:`RECIPE`, segment the test cases; the
    wrong-task rates of its maps."""
    ids = {"dataset_dir": str(datalist.parent), "ckpt_dir": str(run / "models"), **RECIPE}
    run_workflow(BUNDLE, "train", ["train", "demo", *variant], **ids, output_dir=str(run / "logs"))
    run_workflow(BUNDLE, "eval", ["train", "demo", *variant, "evaluate"], **ids, output_dir=str(run),
                 evaluate_section="testing", save_predictions=True, write_report=False)  # fmt: skip
    return wrong_task_rates(run / "predictions", datalist)


@pytest.mark.integration
def test_the_prompt_makes_the_network_answer_the_task_it_is_asked(phantoms, tmp_path):
    datalist = shared_tasks_datalist(phantoms, tmp_path / "data")
    uniseg = trained_rates(datalist, tmp_path / "uniseg", [])
    blind = trained_rates(datalist, tmp_path / "task_blind", ["variants/task_blind"])
    assert max(uniseg.values()) < 0.1 and min(blind.values()) > 0.3, (uniseg, blind)
