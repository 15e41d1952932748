"""Evaluation scores what happened: the four empty / non-empty combinations against values computed by hand, and
the datalist's task definition (its label_map) decides the reference."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import PREDICT_BUNDLE, PREDICT_TINY
from ignite.engine import Engine
from monai.data import MetaTensor

from uniseg_monai.apps.bundles import run_workflow
from uniseg_monai.engine.evaluation import EvaluationReport, TaskDice, score_case
from uniseg_monai.engine.wiring import registry_for_evaluation
from uniseg_monai.model_io.model_files import model_tasks
from uniseg_monai.tasks import TaskError, TaskRegistry

REGISTRY = TaskRegistry().extended({"liver": {"nsd_tolerance": 1.0}}).subset(["liver"])
SPACING = (2.0, 1.0, 1.0)
DIAGONAL = math.sqrt((8 * 2.0) ** 2 + 8**2 + 8**2)  # the 8x8x8 volume's diagonal in mm


def volume(liver: bool = True, tumour: bool = False) -> MetaTensor:
    """(1, 8, 8, 8) label map at 2 x 1 x 1 mm: a liver cube, optionally a tumour inside it."""
    x = torch.zeros(1, 8, 8, 8)
    if liver:
        x[0, 2:6, 2:6, 2:6] = 1
    if tumour:
        x[0, 3:5, 3:5, 3:5] = 2
    return MetaTensor(x, affine=torch.diag(torch.tensor([*SPACING, 1.0])))


# case -> (prediction, reference): the tumour class takes each of the four combinations, the liver is right
CASES = {
    "missed": (volume(), volume(tumour=True)),
    "false_positive": (volume(tumour=True), volume()),
    "neither": (volume(), volume()),
    "both": (volume(tumour=True), volume(tumour=True)),
}


def test_each_combination_scores_as_documented():
    for group, (pred, label) in CASES.items():
        score = score_case(pred, label, 3, hd95=True, nsd_tolerance=1.0)
        assert score.groups == ["both", group]
        assert score.dice[0] == pytest.approx(1.0 if group in ("neither", "both") else 2 * 56 / (56 + 64))  # 8 tumour
        tumour = {"dice": score.dice[1], "hd95": score.hd95[1], "nsd": score.nsd[1]}
        expected = {
            "missed": {"dice": 0.0, "hd95": DIAGONAL, "nsd": 0.0},
            "false_positive": {"dice": 0.0, "hd95": DIAGONAL, "nsd": 0.0},
            "both": {"dice": 1.0, "hd95": 0.0, "nsd": 1.0},
        }.get(group)
        if expected is None:
            assert all(math.isnan(v) for v in tumour.values())
        else:
            assert tumour == pytest.approx(expected)


def test_a_missed_tumour_no_longer_averages_to_a_perfect_distance(tmp_path):
    metric = TaskDice(REGISTRY, hd95=True, nsd=True)

    def step(engine, batch):
        name, (pred, label) = batch
        engine.state.batch = [{"task_id": 0, "image": MetaTensor(torch.zeros(1), meta={"case": name})}]
        return [{"pred": pred, "label": label}]

    engine = Engine(step)
    metric.attach(engine, "dice")
    engine.run(list(CASES.items()), max_epochs=1)
    EvaluationReport(metric, tmp_path, log=None)(engine)
    summary = json.loads((tmp_path / "summary.json").read_text())
    tumour = "liver tumour"
    assert summary["tasks"]["liver"]["per_class"][tumour] == pytest.approx((0 + 0 + 1) / 3)  # "neither" left out
    assert summary["hd95"]["liver"]["per_class"][tumour] == pytest.approx((DIAGONAL + DIAGONAL + 0) / 3)
    assert summary["nsd"]["liver"]["per_class"][tumour] == pytest.approx(1 / 3)
    assert summary["cases"]["liver"][tumour] == {"both": 1, "missed": 1, "false_positive": 1, "neither": 1}
    assert summary["cases"]["liver"]["liver"] == {"both": 4, "missed": 0, "false_positive": 0, "neither": 0}
    with (tmp_path / "per_case.csv").open() as f:
        rows = {(r["case"], r["class"]): r for r in csv.DictReader(f)}
    assert rows[("neither", tumour)]["dice"] == "" and rows[("neither", tumour)]["group"] == "neither"
    assert rows[("missed", tumour)]["hd95_mm"] == f"{DIAGONAL:.2f}" and rows[("missed", tumour)]["nsd"] == "0.0000"
    table = (tmp_path / "per_class.md").read_text()
    assert "| cases: missed | 0 | 1 |" in table and "| NSD (%) |" in table
    assert "NSD (%)" in (tmp_path / "summary.csv").read_text()


def test_nsd_tolerance_is_a_task_fact():
    registry = TaskRegistry()
    assert registry["liver"].surface_tolerance == 3.0 and registry["brats21"].surface_tolerance == 1.0
    assert REGISTRY["liver"].surface_tolerance == 1.0 and REGISTRY.to_json()["liver"]["nsd_tolerance"] == 1.0
    assert "nsd_tolerance" not in registry.to_json()["liver"]
    with pytest.raises(ValueError, match="nsd_tolerance must be a positive number"):
        TaskRegistry().extended({"liver": {"nsd_tolerance": 0}})


def evaluate(datalist: dict, ckpt_dir: Path, root: Path) -> dict[tuple[str, str], float]:
    """Run the pretrain bundle's evaluation of ``datalist`` (its validation cases) with the model in ``ckpt_dir``,
    saving the predictions into ``root/report/predictions``; returns the per-case Dice by (case, class)."""
    root.mkdir()
    (root / "datalist.json").write_text(json.dumps(datalist))
    run_workflow(
        PREDICT_BUNDLE,
        "eval",
        ["train", "evaluate"],
        dataset_dir=str(root),
        ckpt_dir=str(ckpt_dir),
        output_dir=str(root / "report"),
        save_predictions=True,
        num_workers=0,
        **PREDICT_TINY,
    )
    with (root / "report" / "per_case.csv").open() as f:
        return {(r["case"], r["class"]): float(r["dice"] or "nan") for r in csv.DictReader(f)}


def test_evaluation_scores_with_the_datalists_label_map(phantoms, predict_model, tmp_path):
    """README: a datalist overrides the task definition, so its label_map decides the reference the Dice is
    computed against, not the one stored with the model (which has no label_map for ph_organs)."""
    validation = [
        {**item, "image": str(phantoms.parent / item["image"]), "label": str(phantoms.parent / item["label"])}
        for item in json.loads(phantoms.read_text())["validation"]
        if item["task"] == "ph_organs"
    ]
    swap = {"1": 2, "2": 1}  # the datalist's label files name the spleen 1 and the liver 2
    as_stored = evaluate({"validation": validation}, predict_model.parent, tmp_path / "stored")
    swapped = evaluate(
        {"tasks": {"ph_organs": {"label_map": swap}}, "validation": validation}, predict_model.parent, tmp_path / "swap"
    )
    classes = ("liver", "spleen")
    for item in validation:
        case = Path(item["image"]).name.removesuffix(".nii.gz")
        pred = torch.as_tensor(
            np.asarray(nib.load(tmp_path / "swap" / "report" / "predictions" / f"{case}_ph_organs_seg.nii.gz").dataobj)
        )
        raw = torch.as_tensor(np.asarray(nib.load(item["label"]).dataobj))
        mapped = torch.zeros_like(raw)
        for value, target in swap.items():
            mapped[raw == int(value)] = target
        by_hand = {
            m: score_case(pred[None], label[None], 3, hd95=False).dice for m, label in (("raw", raw), ("swap", mapped))
        }
        assert [swapped[(case, c)] for c in classes] == pytest.approx(by_hand["swap"], abs=1e-4, nan_ok=True)
        assert [as_stored[(case, c)] for c in classes] == pytest.approx(by_hand["raw"], abs=1e-4, nan_ok=True)
    assert as_stored != swapped  # the two mappings give different Dice: the test tells them apart


def test_a_datalist_relabels_a_models_task_but_keeps_what_it_was_trained_with(predict_model, tmp_path):
    ckpt, datalist = predict_model.parent, tmp_path / "datalist.json"
    model = model_tasks(ckpt)
    datalist.write_text(json.dumps({"tasks": {"ph_organs": {"label_map": {"2": 1}, "nsd_tolerance": 2.0}}}))
    registry = registry_for_evaluation(datalist, ckpt)
    assert registry["ph_organs"].label_map == {2: 1} and registry["ph_organs"].surface_tolerance == 2.0
    assert registry["ph_organs"].spacing == model["ph_organs"].spacing and registry["ph_liver"] == model["ph_liver"]
    datalist.write_text(json.dumps({"tasks": {"ph_organs": {"spacing": [1, 1, 1], "labels": ["bg", "organ"]}}}))
    with pytest.raises(TaskError) as refused:
        registry_for_evaluation(datalist, ckpt)
    trained = model["ph_organs"]
    assert str(refused.value).startswith(
        f"{datalist}: task 'ph_organs' classes 2 there, {trained.num_classes} in the model; "
        f"task 'ph_organs' spacing [1.0, 1.0, 1.0] there, {list(trained.spacing)} in the model: "
    )
    assert "\n" not in str(refused.value) and "remove those keys" in str(refused.value)
    datalist.write_text(json.dumps({"tasks": {"organs2": {**model["ph_organs"].to_json(), "id": 9}}}))
    with pytest.raises(TaskError, match=r"'organs2' is defined in .* but the model was not trained on it"):
        registry_for_evaluation(datalist, ckpt)["organs2"]


def test_evaluation_refuses_cases_without_labels_and_a_file_as_output_dir(tmp_path):
    from uniseg_monai.core.errors import UsageError
    from uniseg_monai.engine.wiring import start_evaluation

    items = [{"image": str(tmp_path / "a.nii.gz"), "task": "liver"}]
    with pytest.raises(UsageError, match=r"have no 'label' .*a\.nii\.gz.*--evaluate_section.*uniseg predict"):
        start_evaluation(tmp_path / "out", False, items, TaskRegistry())
    (tmp_path / "afile").write_text("mine")
    items = [{**items[0], "label": str(tmp_path / "l.nii.gz")}]
    with pytest.raises(UsageError, match="afile is a file, not a folder"):
        start_evaluation(tmp_path / "afile" / "sub", False, items, TaskRegistry())
    assert not (tmp_path / "out").exists() and (tmp_path / "afile").read_text() == "mine"


def test_overwrite_removes_the_earlier_evaluations_outputs_only(tmp_path):
    """``--overwrite true``: the earlier run's maps, figures and tables go first (a report of the new model never
    shows the old model's overlays); files this package did not write stay; without it the folder is refused."""
    from uniseg_monai.core.run_folder import check_output_dir

    earlier = ["per_case.csv", "summary.json", "report.html", "overlay_ph_liver.png", "dice.png",
               "predictions/case_ph_liver_seg.nii.gz"]  # fmt: skip
    kept = ["notes.txt", "predictions/mine.nii.gz"]
    for name in earlier + kept:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("earlier")
    with pytest.raises(FileExistsError, match="--overwrite true"):
        check_output_dir(tmp_path, False)
    check_output_dir(tmp_path, True)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == sorted(kept)
