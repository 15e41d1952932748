"""The bundles in MONAI Label, offline from a local bundle folder: the real ``monailabel`` package's
``BundleInferTask`` (the task chosen per request) and ``BundleTrainTask`` (one short training updating model.pt)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import monailabel_bundle

from uniseg_monai.apps.bundles import bundle_workflow
from uniseg_monai.apps.label_server import monailabel_imports
from uniseg_monai.core.errors import user_error
from uniseg_monai.data.phantoms import generate_downstream_phantoms
from uniseg_monai.engine.wiring import registry_for_datalist
from uniseg_monai.model_io.model_files import read_model
from uniseg_monai.tasks import TaskRegistry

monailabel_imports()  # torchvision's stand-in where no CPU build imports (README: "MONAI Label")
from monailabel.tasks.infer.bundle import BundleInferTask  # noqa: E402
from monailabel.tasks.train.bundle import BundleTrainTask  # noqa: E402


@pytest.fixture(scope="module")
def bundle(phantoms, tmp_path_factory) -> Path:
    return monailabel_bundle("uniseg_pretrain", registry_for_datalist(phantoms), tmp_path_factory.mktemp("monailabel"))


def _bundle_prediction(bundle: Path, phantoms: Path, task: str, out: Path) -> Path:
    """The bundle's own ``inference.json`` on the first test case, as ``task``."""
    wf = bundle_workflow(
        bundle, "infer", ["inference"], dataset_dir=str(phantoms.parent), output_dir=str(out), task=task
    )
    first = wf.parser.get_parsed_content("items")[0]
    wf.parser["dataset#data"] = [first]
    wf.initialize()
    wf.run()
    wf.finalize()
    (found,) = (out / "predictions").glob(f"*_{task}_seg.nii.gz")
    return found


@pytest.mark.integration
@pytest.mark.exactness
def test_infer_task_segments_the_chosen_task_in_the_input_geometry(bundle, phantoms, tmp_path):
    infer = BundleInferTask(str(bundle), conf={})
    assert infer.is_valid()
    assert infer.config()["task"] == ["ph_organs", "ph_liver", "ph_brain", "ph_petct"]  # the drop-down
    assert "liver: liver tumour" in " ".join(infer.labels)  # label names from channel_def
    item = json.loads(phantoms.read_text())["testing"][0]
    image = phantoms.parent / item["image"]
    source = nib.load(image)
    maps = {}
    for task in ("ph_organs", "ph_liver"):  # two tasks on the same CT volume
        label_file, _ = infer({"image": str(image), "task": task, "device": "cpu"})
        seg = nib.load(label_file)
        assert seg.shape == source.shape
        np.testing.assert_allclose(seg.affine, source.affine, atol=1e-4)
        maps[task] = np.asarray(seg.dataobj)
        # the same labels as the bundle's own inference of that task: the request's task reached the network
        own = nib.load(_bundle_prediction(bundle, phantoms, task, tmp_path / task))
        np.testing.assert_array_equal(maps[task], np.asarray(own.dataobj))
    assert not np.array_equal(maps["ph_organs"], maps["ph_liver"])
    with pytest.raises(Exception, match="no task given"):  # a request that chose no task (REST default)
        infer({"image": str(image), "device": "cpu"})
    with pytest.raises(Exception, match=r"task name '\.\./x': use letters"):  # a request naming no task name
        infer({"image": str(image), "task": "../x", "device": "cpu"})


@pytest.mark.integration
def test_fine_tuning_bundle_segments_its_one_task(tmp_path):
    bundle = monailabel_bundle("uniseg_finetune_vs", TaskRegistry().subset(["vs"]), tmp_path)
    image = next(generate_downstream_phantoms(tmp_path / "vs", "vs", cases=1).rglob("vs_gk_t1_refT1.nii.gz"))
    infer = BundleInferTask(str(bundle), conf={})
    assert infer.config()["task"] == ["vs"] and infer.labels == {"vestibular schwannoma": 1}  # channel_def
    label_file, _ = infer({"image": str(image), "device": "cpu"})  # no task in the request: the bundle's task
    seg, source = nib.load(label_file), nib.load(image)
    assert seg.shape == source.shape
    np.testing.assert_allclose(seg.affine, source.affine, atol=1e-4)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1}


class _Labelled:
    """What BundleTrainTask needs of a MONAI Label datastore: the labelled images."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def datalist(self) -> list[dict]:
        return self.items


@pytest.mark.integration
def test_train_task_fine_tunes_the_chosen_task_and_updates_model_pt(bundle, phantoms):
    data = json.loads(phantoms.read_text())
    root = phantoms.parent
    items = [
        {"image": str(root / i["image"]), "label": str(root / i["label"])}
        for i in data["training"]
        if i["task"] == "ph_liver"
    ][:4]
    before = read_model(bundle / "models" / "model.pt").state
    train = BundleTrainTask(str(bundle), conf={})
    assert train.is_valid() and train.config()["task"] == ["ph_organs", "ph_liver", "ph_brain", "ph_petct"]
    request = {"model": "uniseg_pretrain", "task": "ph_liver", "max_epochs": 1, "val_split": 0.5, "device": "cpu"}
    train({**train.config(), **request, "multi_gpu": False}, _Labelled(items))

    trained = read_model(bundle / "models" / "model.pt")
    assert trained.tasks.names == ["ph_organs", "ph_liver", "ph_brain", "ph_petct"] and trained.network_def
    after = trained.state
    assert set(after) == set(before)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # trained and saved in place
    (kept,) = (bundle / "models").glob("model_before_*.pt")  # the previous model is kept
    previous = read_model(kept).state
    assert all(torch.equal(previous[k], before[k]) for k in before)


def test_a_train_request_naming_no_task_name_is_refused_before_anything_changes(bundle, phantoms):
    root = phantoms.parent
    item = json.loads(phantoms.read_text())["training"][0]
    items = [{"image": str(root / item["image"]), "label": str(root / item["label"])}] * 2
    models = {p: p.read_bytes() for p in (bundle / "models").iterdir()}
    train = BundleTrainTask(str(bundle), conf={})
    request = {"model": "uniseg_pretrain", "task": "../x", "max_epochs": 1, "val_split": 0.5, "device": "cpu"}
    with pytest.raises(Exception) as raised:  # MONAI wraps it; the one line printed is the user error's
        train({**train.config(), **request, "multi_gpu": False}, _Labelled(items))
    assert str(user_error(raised.value)).startswith("MONAI Label request: task: task name '../x': use letters")
    assert {p: p.read_bytes() for p in (bundle / "models").iterdir()} == models
