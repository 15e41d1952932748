"""The uniseg_pretrain bundle, model-zoo style: metadata, properties, train / resume / evaluate / infer, export,
and a 2-rank gloo run under torchrun, all on the phantom data set with tiny overrides."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import free_port, integration, shared_path
from ignite.engine import Events
from monai.bundle import ConfigWorkflow, ckpt_export, verify_metadata, verify_net_in_out

from uniseg_monai.apps.bundles import bundle_workflow
from uniseg_monai.apps.metadata import channel_def
from uniseg_monai.core.errors import UsageError, user_error
from uniseg_monai.data import TaskUniformSampler, load_items
from uniseg_monai.engine.wiring import item_task_ids, registry_for_datalist
from uniseg_monai.model_io.model_files import build_network
from uniseg_monai.networks import nnunet_features
from uniseg_monai.tasks import PAPER_UPSTREAM_TASKS, TaskRegistry, load_model_tasks

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "uniseg_pretrain"
CONFIGS = BUNDLE / "configs"
TINY = {
    "patch_size": [64, 64, 32],
    "base_features": 4,
    "iterations_per_epoch": 2,
    "val_interval": 1,
    "num_workers": 0,
    "sw_batch_size": 2,
    "cache_rate": 0.0,
}


def configs(*names: str) -> list[str]:
    return [str(CONFIGS / f"{n}.json") for n in names]


def workflow(kind: str, names: list[str], **override) -> ConfigWorkflow:
    return bundle_workflow(BUNDLE, kind, names, **override)


def run_dirs(phantoms: Path, root: Path, **extra) -> dict:
    """Data, checkpoint and output folders of a run in ``root``, the tiny settings, and ``extra`` on top."""
    dirs = {"dataset_dir": str(phantoms.parent), "ckpt_dir": str(root / "models"), "output_dir": str(root / "eval")}
    return {**dirs, **TINY, **extra}


def test_metadata_verifies_offline_and_matches_the_task_registry():
    schema = shared_path("schemas/meta_schema_20240725.json")
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(schema))  # raises when invalid
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    paper = load_model_tasks(BUNDLE / "models")
    assert paper.to_json() == TaskRegistry().subset(PAPER_UPSTREAM_TASKS).to_json()
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == channel_def(paper)
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == paper.num_classes == 4
    assert meta["schema"].endswith("meta_schema_20240725.json")


def test_train_properties_are_complete(phantoms, tmp_path):
    assert workflow("train", ["train"], **run_dirs(phantoms, tmp_path)).check_properties() == []


@pytest.mark.integration
def test_training_on_one_task_of_the_datalist(phantoms, tmp_path):
    wf = workflow("train", ["train"], **run_dirs(phantoms, tmp_path, task="ph_brain"))
    for section in ("train", "validate"):
        assert {i["task"] for i in wf.parser.get_parsed_content(f"{section}#dataset#data")} == {"ph_brain"}
    assert wf.parser.get_parsed_content("network_def").num_tasks == 4  # the network keeps every task


def test_network_in_out_with_the_task_as_extra_argument(phantoms):
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=str(CONFIGS / "train.json"),
        n=2,
        any=1,
        extra_forward_args={"task_id": torch.tensor([1])},
        dataset_dir=str(phantoms.parent),
        base_features=4,
        patch_size=[64, 64, 32],
        **{"_meta_#network_data_format#inputs#image#num_channels": 1},
    )


@pytest.fixture(scope="module")
@integration
def trained(phantoms, tmp_path_factory) -> Path:
    """One epoch, then an interrupted-and-resumed second epoch; returns the run folder."""
    root = tmp_path_factory.mktemp("pretrain")
    first = workflow("train", ["train"], **run_dirs(phantoms, root, epochs=1))
    first.run()
    first.finalize()
    assert sorted(p.name for p in (root / "models").iterdir()) == ["checkpoint_epoch=1.pt", "model.pt", "tasks.json"]
    with pytest.raises(RuntimeError) as refused:  # a new run never overwrites the earlier one
        workflow("train", ["train"], **run_dirs(phantoms, root, epochs=2))
    assert isinstance(refused.value.__cause__, FileExistsError) and "--resume true" in str(refused.value.__cause__)

    resumed = workflow("train", ["train"], **run_dirs(phantoms, root, epochs=2, resume=True))
    trainer = resumed.parser.get_parsed_content("train#trainer")
    ran = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: ran.append(e.state.iteration))
    resumed.run()
    resumed.finalize()
    assert ran == [3, 4]  # continued at iteration 3 of 4, not from scratch
    assert trainer.state.epoch == 2
    saved = torch.load(root / "models" / "checkpoint_epoch=2.pt", weights_only=True)
    assert saved["trainer"]["iteration"] == 4 and saved["lr_scheduler"]["last_epoch"] == 2
    assert saved["lr_scheduler"]["total_iters"] == 2  # the poly schedule stretched to the new --epochs, not lr 0
    return root


def test_training_resumes_and_writes_model_and_tasks(trained, phantoms):
    tasks = registry_for_datalist(phantoms).to_json()
    assert load_model_tasks(trained / "models").to_json() == tasks
    for name in ("model.pt", "checkpoint_epoch=2.pt"):  # both describe themselves: network and task table
        saved = torch.load(trained / "models" / name, weights_only=True)
        assert saved["tasks"] == tasks
        network = build_network(saved["network_def"])
        network.load_state_dict(saved["model"], strict=True)
        assert network.network_def()["features"] == list(nnunet_features(TINY["base_features"]))
    assert any(p.name.startswith("events.out.tfevents") for p in (trained / "eval").iterdir())


def test_evaluation_writes_the_report(trained, phantoms):
    wf = workflow("eval", ["train", "evaluate"], **run_dirs(phantoms, trained, output_dir=str(trained / "report")))
    wf.run()
    wf.finalize()
    report = trained / "report"
    summary = json.loads((report / "summary.json").read_text())
    tasks = ["ph_organs", "ph_liver", "ph_brain", "ph_petct"]
    assert sorted(summary["tasks"]) == sorted(tasks)
    assert 0 <= summary["mean_dice"] <= 1
    assert summary["mean_dice"] == pytest.approx(np.mean([summary["tasks"][t]["dice"] for t in tasks]))
    assert set(summary["tasks"]["ph_brain"]["per_class"]) == {"edema", "necrotic core", "enhancing tumour"}
    assert (report / "summary.md").read_text().splitlines()[0] == "| metric | " + " | ".join(tasks) + " | mean |"
    assert "HD95 (mm)" in (report / "summary.csv").read_text()
    rows = (report / "per_case.csv").read_text().splitlines()
    validation = load_items(phantoms, "validation", registry_for_datalist(phantoms))
    expected_rows = sum(len(registry_for_datalist(phantoms)[i["task"]].labels) - 1 for i in validation)
    assert len(rows) == 1 + expected_rows
    before = (report / "per_case.csv").stat().st_mtime_ns
    with pytest.raises(RuntimeError) as refused:  # an earlier report is never replaced without --overwrite true
        workflow("eval", ["train", "evaluate"], **run_dirs(phantoms, trained, output_dir=str(report)))
    assert isinstance(refused.value.__cause__, FileExistsError) and "--overwrite true" in str(refused.value.__cause__)
    assert (report / "per_case.csv").stat().st_mtime_ns == before


def test_inference_keeps_the_input_geometry_and_names_the_task(trained, phantoms):
    wf = workflow("infer", ["inference"], **run_dirs(phantoms, trained, output_dir=str(trained / "infer")))
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    registry = registry_for_datalist(phantoms)
    for item in load_items(phantoms, "testing", registry):
        image = item["image"][0] if isinstance(item["image"], list) else item["image"]
        stem = Path(image).name.removesuffix(".nii.gz")
        pred = nib.load(trained / "infer" / "predictions" / f"{stem}_{item['task']}_seg.nii.gz")
        source = nib.load(image)
        assert pred.shape == source.shape[:3]
        np.testing.assert_allclose(pred.affine, source.affine, atol=1e-4)
        assert int(np.asarray(pred.dataobj).max()) < registry[item["task"]].num_classes


def test_inference_task_from_the_command_line_and_never_over_earlier_predictions(trained, phantoms, tmp_path):
    data = json.loads(phantoms.read_text())
    ct_only = phantoms.with_name("datalist_ct.json")
    ct_only.write_text(json.dumps({"testing": [i for i in data["testing"] if i["task"] == "ph_organs"]}))
    out = trained / "infer_liver"
    ids = run_dirs(phantoms, trained, output_dir=str(out), task="ph_liver", datalist=str(ct_only))
    wf = workflow("infer", ["inference"], **ids)
    wf.run()
    wf.finalize()
    assert sorted(p.name.split("_")[-2] for p in (out / "predictions").iterdir()) == ["liver"] * 2
    before = {p.name: p.stat().st_mtime_ns for p in (out / "predictions").iterdir()}
    again = workflow("infer", ["inference"], **ids)
    with pytest.raises(Exception) as refused:
        again.run()  # an earlier run's predictions are never replaced without --overwrite true
    assert re.search("already holds 2 prediction.* --overwrite true", str(user_error(refused.value)))
    assert {p.name: p.stat().st_mtime_ns for p in (out / "predictions").iterdir()} == before
    replaced = workflow("infer", ["inference"], **ids, overwrite=True)
    replaced.run()
    replaced.finalize()
    after = {p.name: p.stat().st_mtime_ns for p in (out / "predictions").iterdir()}
    assert after.keys() == before.keys() and all(after[n] != before[n] for n in before)
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = workflow("infer", ["inference"], **run_dirs(phantoms, trained, output_dir=str(out / "x"),
                                                                 dataset_dir=str(empty)))  # fmt: skip
    with pytest.raises(Exception) as refused:
        nothing.run()
    assert isinstance(user_error(refused.value), UsageError)
    assert f"--dataset_dir {empty} holds no datalist.json and no *.nii.gz" in str(user_error(refused.value))
    assert not (out / "x").exists()


def test_torchscript_export_takes_image_and_task(trained, phantoms, tmp_path):
    ts = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(ts),
        ckpt_file=str(trained / "models" / "model.pt"),
        key_in_ckpt="model",  # model files are {"model", "network_def", "tasks"}
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=str(CONFIGS / "train.json"),
        dataset_dir=str(phantoms.parent),
        base_features=4,
        patch_size=[64, 64, 32],
    )
    scripted = torch.jit.load(str(ts))
    wf = workflow("infer", ["inference"], **run_dirs(phantoms, trained))
    net = wf.network_def.eval()
    net.load_state_dict(torch.load(trained / "models" / "model.pt", weights_only=True)["model"])
    x = torch.randn(1, 4, 64, 96, 64)  # a 4-channel window of another admissible size
    with torch.no_grad():
        torch.testing.assert_close(scripted(x, torch.tensor([2])), net(x, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.integration
def test_two_rank_gloo_training_and_evaluation(phantoms, tmp_path):
    common = [f"--{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in run_dirs(phantoms, tmp_path).items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(*files: str, extra=()) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "-m", "monai.bundle", "run", "--config_file", json.dumps(configs(*files)),
               "--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf"),
               "--bundle_root", str(BUNDLE), "--backend", "gloo", *common, *extra]  # fmt: skip
        # two ranks write progress bars to one pipe: a multi-byte character can be split between them
        done = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    torchrun("train", "multi_gpu_train", extra=["--epochs=1"])
    assert (tmp_path / "models" / "model.pt").exists() and (tmp_path / "models" / "checkpoint_epoch=1.pt").exists()
    torchrun("train", "evaluate", "multi_gpu_evaluate", extra=[f"--output_dir={tmp_path / 'report'}"])
    rows = (tmp_path / "report" / "per_case.csv").read_text().splitlines()[1:]
    cases = {tuple(r.split(",")[:2]) for r in rows}
    assert len(cases) == 8  # both ranks' validation cases gathered: 2 per task


@pytest.mark.integration
def test_two_nodes_train_with_the_sampler_split_by_global_rank(phantoms, tmp_path):
    """Two torchrun "nodes" on this machine (--nnodes 2 --node_rank 0/1, one process each, one master endpoint)
    train one epoch of 2 iterations with gloo on the same datalist, filling one disk cache: each process has its global
    rank and draws that rank's sampler stream (the streams differ); rank 0 alone writes the checkpoint."""
    port = free_port()
    seen = ("{'rank': dist.get_rank(), 'world': dist.get_world_size(), 'sampler_rank': @train#sampler.rank, "
            "'iterations': @train#trainer.state.iteration, 'indices': list(@train#sampler)}")  # fmt: skip
    record = f"$torch.save({seen}, '{tmp_path}/rank%d.pt' % dist.get_rank())"
    run = json.loads((CONFIGS / "multi_gpu_train.json").read_text())["run"]
    probe = tmp_path / "probe.json"  # the overlay's run list, then the epoch-0 indices of this rank's sampler
    probe.write_text(json.dumps({"run": [*run, "$@train#sampler.set_epoch(0)", record]}))
    cache = {"dataset_type": "disk", "cache_rate": 1.0, "cache_dir": str(tmp_path / "cache")}  # one folder, 2 nodes
    ids = run_dirs(phantoms, tmp_path, epochs=1, val_interval=2, validation_required=False, **cache)  # no validation
    files = json.dumps([*configs("train", "multi_gpu_train"), str(probe)])
    bundle = ["-m", "monai.bundle", "run", "--config_file", files, "--meta_file", str(CONFIGS / "metadata.json"),
              "--logging_file", str(CONFIGS / "logging.conf"), "--bundle_root", str(BUNDLE), "--backend", "gloo",
              *(f"--{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in ids.items())]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                "--master_addr=127.0.0.1", f"--master_port={port}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, "errors": "replace", "env": env}
    nodes = [subprocess.Popen([*torchrun, f"--node_rank={node}", *bundle], **pipe) for node in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [(r["rank"], r["world"], r["sampler_rank"], r["iterations"]) for r in ranks] == [(0, 2, 0, 2), (1, 2, 1, 2)]
    registry = registry_for_datalist(phantoms)
    task_ids = item_task_ids(load_items(phantoms, "training", registry), registry)
    expected = [list(TaskUniformSampler(task_ids, 4, 2, seed=0, rank=r)) for r in (0, 1)]
    assert [r["indices"] for r in ranks] == expected and expected[0] != expected[1]
    assert sorted(p.name for p in (tmp_path / "models").glob("*.pt")) == ["checkpoint_epoch=1.pt"]
    assert len(list((tmp_path / "cache").iterdir())) == 24 + 8  # training and validation cases, no temporaries
