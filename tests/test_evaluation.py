"""Evaluation scores what happened: the four empty / non-empty combinations against values computed by hand."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor

from uniseg_monai.evaluation import EvaluationReport, TaskDice, score_case
from uniseg_monai.tasks import TaskRegistry

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
