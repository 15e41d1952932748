"""``uniseg report``: a run folder (TensorBoard logs, evaluation, saved predictions) becomes report.html + PNGs."""

from __future__ import annotations

import json
import re

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from torch.utils.tensorboard import SummaryWriter

from uniseg_monai.apps.report import CURVES_SIZE, FIGURE_DPI, write_report
from uniseg_monai.cli import main
from uniseg_monai.data.datalist import load_items
from uniseg_monai.data.transforms import image_stem
from uniseg_monai.engine.evaluation import EvaluationReport, TaskDice
from uniseg_monai.engine.wiring import registry_for_datalist


@pytest.fixture(scope="module")
def run(phantoms, tmp_path_factory):
    """A run folder as training + evaluation + inference leave it, from the phantoms' test cases: TensorBoard
    scalars, per_case.csv / summary.json, and predictions = the references with 0-2 slices of foreground removed
    (so the cases rank)."""
    folder = tmp_path_factory.mktemp("run")
    writer = SummaryWriter(str(folder / "logs"))
    for step in range(1, 41):
        writer.add_scalar("train_loss", 2.0 / step, step)
        writer.add_scalar("lr", 0.01 * (1 - step / 41) ** 0.9, step)
    for epoch in (10, 20):
        writer.add_scalar("val_mean_dice", epoch / 25, epoch)
        writer.add_scalar("val_mean_dice/ph_organs", epoch / 22, epoch)
    writer.close()
    registry = registry_for_datalist(phantoms)
    items = [i for i in load_items(phantoms, "testing", registry) if registry[i["task"]].in_channels == 1]
    metric = TaskDice(registry, hd95=True, nsd=True)
    batches = []
    for n, item in enumerate(items):
        ref = nib.load(item["label"])
        raw = np.asarray(ref.dataobj)
        pred = raw.copy()
        rows = np.nonzero(pred.any(axis=(1, 2)))[0]
        pred[rows[: n % 3]] = 0
        name = image_stem(item["image"])
        (folder / "predictions").mkdir(exist_ok=True)
        nib.save(
            nib.Nifti1Image(pred.astype(np.uint8), ref.affine),
            folder / "predictions" / f"{name}_{item['task']}_seg.nii.gz",
        )
        meta = {"case": name, "affine": torch.as_tensor(ref.affine)}
        batches.append((item["task"], MetaTensor(torch.as_tensor(pred[None]).float(), meta=meta),
                        MetaTensor(torch.as_tensor(raw[None]).float(), meta=meta), name))  # fmt: skip

    def step(engine, batch):
        task, pred, label, name = batch
        engine.state.batch = [{"task_id": registry[task].id, "image": MetaTensor(torch.zeros(1), meta={"case": name})}]
        return [{"pred": pred, "label": label}]

    engine = Engine(step)
    metric.attach(engine, "dice")
    engine.run(batches, max_epochs=1)
    EvaluationReport(metric, folder, log=None)(engine)
    return folder


def pngs_of(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def test_report_shows_every_part_and_the_summary_numbers(run, phantoms, tmp_path):
    out = tmp_path / "report"
    page_path = write_report(run, out, datalist=phantoms, progress=False)
    page = page_path.read_text()
    listed = pngs_of(page)
    assert set(listed) == {p.name for p in out.glob("*.png")}  # every PNG listed is there and vice versa
    assert {"curves.png", "dice.png", "overlay_ph_organs.png", "overlay_ph_liver.png", "prompt.png"} <= set(listed)
    for name in listed:
        image = matplotlib.image.imread(out / name)
        assert image[..., :3].std() > 0.01  # not blank
    width, height = CURVES_SIZE
    assert matplotlib.image.imread(out / "curves.png").shape[:2] == (height * FIGURE_DPI, width * FIGURE_DPI)
    assert matplotlib.image.imread(out / "overlay_ph_organs.png").shape[:2] == (9 * FIGURE_DPI, 9 * FIGURE_DPI)
    summary = json.loads((run / "summary.json").read_text())
    cells = re.search(r"<tr><th>Dice \(%\)</th>(.*?)</tr>", page).group(1)
    shown = [float(v) for v in re.findall(r"<td>([\d.]+)</td>", cells)]
    expected = [100 * summary["tasks"][t]["dice"] for t in summary["tasks"]] + [100 * summary["mean_dice"]]
    assert shown == pytest.approx(expected, abs=0.005)
    assert "Not in this report" not in page


def test_a_folder_without_evaluation_gives_what_exists_with_notes(run, tmp_path, capsys):
    bare = tmp_path / "bare"
    (bare / "logs").mkdir(parents=True)
    for event in (run / "logs").iterdir():
        (bare / "logs" / event.name).write_bytes(event.read_bytes())
    main(["report", str(bare)])
    page = (bare / "report.html").read_text()
    assert pngs_of(page) == ["curves.png"] and "per_case.csv not found" in page and "no overlays" in page
    assert capsys.readouterr().out.strip() == str(bare / "report.html")
    with pytest.raises(SystemExit) as done:
        main(["report", str(tmp_path / "missing")])
    assert done.value.code == 2 and "run folder" in capsys.readouterr().err
    (bare / "per_case.csv").write_text("case,task,class,dice\na,liver,liver,abc\n")
    (tmp_path / "afile").write_text("mine")
    for args, expected in (
        ([str(bare)], "per_case.csv: not an evaluation table"),
        ([str(bare), "--out", str(tmp_path / "afile")], "is a file"),
    ):
        with pytest.raises(SystemExit) as done:
            main(["report", *args])
        assert done.value.code == 2 and expected in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    (bare / "per_case.csv").write_text("garbage,,,\n")
    for args, expected in (
        ([str(tmp_path / "empty")], "nothing to report"),
        ([str(tmp_path / "afile")], "is a file, not a folder"),
        ([str(bare)], "no column(s) task, case, dice"),
    ):
        with pytest.raises(SystemExit) as done:
            main(["report", *args])
        assert done.value.code == 2 and expected in capsys.readouterr().err
    assert not any((tmp_path / "empty").iterdir())
