"""The fine-tuning bundles (BTCV, VS), model-zoo style, on BTCV-like (14 classes) and VS-like phantoms prepared
from the public releases' layouts: metadata, properties, transfer from a UniSeg checkpoint, train / evaluate /
infer, the loader's refusal of a mismatched checkpoint, the UNETR / SwinUNETR overlays and a 2-rank gloo run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import free_port, integration, shared_path
from monai.bundle import ConfigWorkflow, verify_metadata, verify_net_in_out

from uniseg_monai.apps.bundles import bundle_workflow
from uniseg_monai.apps.metadata import channel_def
from uniseg_monai.core.errors import UsageError
from uniseg_monai.data import load_items
from uniseg_monai.data.phantoms import generate_downstream_phantoms
from uniseg_monai.data.prepare import prepare
from uniseg_monai.engine.wiring import registry_for_datalist, registry_for_run
from uniseg_monai.model_io.transfer import PretrainedCheckpointError
from uniseg_monai.networks import UniSeg
from uniseg_monai.tasks import TaskRegistry, load_model_tasks

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
KINDS = {"btcv": "uniseg_finetune_btcv", "vs": "uniseg_finetune_vs"}
PHANTOM_SPACING = {"btcv": [3.0, 3.0, 5.0], "vs": [1.0, 1.0, 2.0]}
ARCH = {
    "features": [4, 8, 16, 32],
    "kernel_sizes": [[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
    "strides": [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]],
}
TINY = {
    **ARCH,
    "patch_size": [32, 32, 16],
    "epochs": 1,
    "iterations_per_epoch": 2,
    "val_interval": 1,
    "num_workers": 0,
    "sw_batch_size": 4,
    "cache_rate": 0.0,
}


def configs(kind: str, *names: str) -> list[str]:
    return [str(BUNDLES / KINDS[kind] / "configs" / f"{n}.json") for n in names]


def workflow(kind: str, workflow_type: str, names: list[str], **override) -> ConfigWorkflow:
    return bundle_workflow(BUNDLES / KINDS[kind], workflow_type, names, **override)


@pytest.fixture(scope="module", params=list(KINDS))
def downstream(request, tmp_path_factory) -> tuple[str, Path]:
    """(kind, datalist) of 6 phantoms in the release layout, prepared as task ``ph_<kind>`` (3 train, 1 val, 2
    test), at a coarse spacing so the tests stay fast."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    generate_downstream_phantoms(root / "raw", kind, cases=6, spacing=PHANTOM_SPACING[kind])
    datalist = root / "datalist.json"
    prepare(root / "raw", f"ph_{kind}", datalist, fmt=kind, val_fraction=0.25, test_fraction=0.34)
    return kind, datalist


def run_dirs(kind: str, datalist: Path, root: Path, **extra) -> dict:
    dirs = {"dataset_dir": str(datalist.parent), "ckpt_dir": str(root / "models"), "output_dir": str(root / "eval")}
    return {**dirs, "task": f"ph_{kind}", **TINY, **extra}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A pretrain-bundle-style checkpoint of a tiny 4-task UniSeg with the test architecture."""
    torch.manual_seed(1)
    net = UniSeg(num_tasks=4, num_classes=4, patch_size=TINY["patch_size"], **ARCH)
    path = tmp_path_factory.mktemp("pretrained") / "model.pt"
    torch.save({"model": net.state_dict()}, path)
    return path


@pytest.mark.parametrize("kind", list(KINDS))
def test_metadata_verifies_offline_and_lists_the_task_labels(kind):
    folder = BUNDLES / KINDS[kind]
    verify_metadata(
        meta_file=str(folder / "configs" / "metadata.json"),
        filepath=str(shared_path("schemas/meta_schema_20240725.json")),
    )
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    tasks = load_model_tasks(folder / "models")
    assert tasks.to_json() == TaskRegistry().subset([kind]).to_json()
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == channel_def(tasks) and pred["num_channels"] == {"btcv": 14, "vs": 2}[kind]
    if kind == "btcv":
        assert pred["channel_def"]["1"] == "spleen" and pred["channel_def"]["13"] == "left adrenal gland"


def test_the_two_bundles_differ_only_in_task_data_and_normalisation():
    """One definition of the fine-tuning pipeline: the bundles' configs may differ in these ids only."""
    allowed = {"dataset_dir", "task", "normalization"}
    for name in ("train", "evaluate", "inference", "multi_gpu_train", "multi_gpu_evaluate", "unetr", "swinunetr"):
        btcv, vs = (json.loads(Path(configs(k, name)[0]).read_text()) for k in KINDS)
        assert set(btcv) == set(vs), name
        assert {k for k in btcv if btcv[k] != vs[k]} <= allowed, name


def test_a_datalist_without_the_bundles_task_is_one_line_naming_it(tmp_path):
    spec = {"id": 1, "modalities": ["CT"], "labels": ["background", "organ"], "spacing": [1.0, 1.0, 1.0]}
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"tasks": {"my_org": spec}, "training": []}))
    for normalization in (None, [{"_target_": "NormalizeIntensityd", "keys": "image"}]):
        with pytest.raises(UsageError) as err:
            registry_for_run(datalist, tmp_path, "btcv", normalization)
        message = str(err.value)
        assert "\n" not in message and "missing" not in message
        assert f"{datalist} has no task 'btcv', the task this bundle fine-tunes" in message
        assert '"tasks" table, or set --task' in message and "['my_org']" in message
    assert registry_for_run(datalist, tmp_path, "my_org").names == ["my_org"]


def test_properties_and_network_in_out(downstream, tmp_path):
    kind, datalist = downstream
    dirs = run_dirs(kind, datalist, tmp_path)
    assert workflow(kind, "train", ["train"], **dirs).check_properties() == []
    assert workflow(kind, "infer", ["inference"], **dirs).check_properties() == []
    verify_net_in_out(
        net_id="network_def",
        meta_file=configs(kind, "metadata")[0],
        config_file=configs(kind, "train")[0],
        n=1,
        any=1,
        dataset_dir=str(datalist.parent),
        **{
            k: v
            for k, v in run_dirs(kind, datalist, tmp_path).items()
            if k in ("task", "features", "kernel_sizes", "strides")
        },
        **{"_meta_#network_data_format#inputs#image#spatial_shape": ["32*n", "32*n", "16*n"]},
    )


@pytest.fixture(scope="module")
@integration
def finetuned(downstream, pretrained, tmp_path_factory) -> tuple[str, Path, Path]:
    """One fine-tuning epoch from the pretrained checkpoint; returns (kind, datalist, run folder)."""
    kind, datalist = downstream
    root = tmp_path_factory.mktemp(f"finetune_{kind}")
    wf = workflow(kind, "train", ["train"], **run_dirs(kind, datalist, root, pretrained=str(pretrained)))
    network = wf.parser.get_parsed_content("network")
    source = torch.load(pretrained, weights_only=True)["model"]
    assert torch.equal(network.state_dict()["encoder.2.0.conv.weight"], source["encoder.2.0.conv.weight"])
    first_up = source["decoder.0.upsample.conv.weight"]
    assert torch.equal(network.state_dict()["decoder.0.upsample.conv.weight"], first_up[: first_up.shape[0] - 1])
    wf.run()
    wf.finalize()
    assert {"model.pt", "checkpoint_epoch=1.pt", "tasks.json"} <= {p.name for p in (root / "models").iterdir()}
    return kind, datalist, root


def test_evaluation_writes_the_table3_layout_and_the_report_with_overlays(finetuned):
    kind, datalist, root = finetuned
    dirs = run_dirs(kind, datalist, root, output_dir=str(root / "report"), evaluate_section="testing")
    wf = workflow(kind, "eval", ["train", "evaluate"], **dirs)
    wf.run()
    wf.finalize()
    header = (root / "report" / "per_class.md").read_text().splitlines()[2]
    columns = {"btcv": "Sp | RKi | LKi | Gb | Es | Li | St | Ao | IVC | PSV | Pa | RAG | LAG", "vs": "VS"}[kind]
    assert header == f"| metric | {columns} | Mean |"
    summary = json.loads((root / "report" / "summary.json").read_text())
    assert list(summary["tasks"]) == [f"ph_{kind}"] and 0 <= summary["mean_dice"] <= 1
    assert len((root / "report" / "per_case.csv").read_text().splitlines()) == 1 + 2 * {"btcv": 13, "vs": 1}[kind]
    # the same report as pretraining's: the predictions are saved by default, so the best / median / worst overlays
    assert len(list((root / "report" / "predictions").glob("*_seg.nii.gz"))) == 2
    assert f"overlay_ph_{kind}.png" in (root / "report" / "report.html").read_text()
    assert (root / "report" / f"overlay_ph_{kind}.png").read_bytes()[:4] == b"\x89PNG"


def test_inference_keeps_the_input_geometry(finetuned):
    kind, datalist, root = finetuned
    dirs = run_dirs(kind, datalist, root, output_dir=str(root / "infer"))
    wf = workflow(kind, "infer", ["inference"], **dirs)
    wf.run()
    wf.finalize()
    items = load_items(datalist, "testing", registry_for_datalist(datalist))
    assert len(items) == len({p.name for p in (root / "infer" / "predictions").iterdir()}) == 2
    for item in items:
        stem = item.get("case") or Path(item["image"]).name.removesuffix(".nii.gz")  # VS: the case folder
        pred = nib.load(root / "infer" / "predictions" / f"{stem}_ph_{kind}_seg.nii.gz")
        source = nib.load(item["image"])
        assert pred.shape == source.shape
        np.testing.assert_allclose(pred.affine, source.affine, atol=1e-4)
        assert int(np.asarray(pred.dataobj).max()) < {"btcv": 14, "vs": 2}[kind]


@pytest.mark.integration
def test_a_mismatched_pretrained_checkpoint_is_refused(downstream, tmp_path):
    kind, datalist = downstream
    wide = UniSeg(num_tasks=4, num_classes=4, patch_size=TINY["patch_size"], **{**ARCH, "features": [8, 16, 32, 64]})
    path = tmp_path / "wide.pt"
    torch.save({"model": wide.state_dict()}, path)
    wf = workflow(kind, "train", ["train"], **run_dirs(kind, datalist, tmp_path, pretrained=str(path)))
    with pytest.raises(RuntimeError) as refused:
        wf.parser.get_parsed_content("network")
    cause = refused.value.__cause__
    assert isinstance(cause, PretrainedCheckpointError) and str(path) in str(cause) and "shape" in str(cause)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("overlay", "network", "patch"),
    [  # SwinUNETR halves the size 5 times and needs >= 2 voxels left for its instance norm
        ("unetr", {"feature_size": 8, "hidden_size": 96, "mlp_dim": 192}, 32),
        ("swinunetr", {"feature_size": 12}, 64),
    ],
)
def test_baseline_overlays_train_one_iteration(overlay, network, patch, tmp_path):
    kind = "btcv"
    root = tmp_path / "data"
    generate_downstream_phantoms(root / "raw", kind, cases=3, spacing=[4.0, 4.0, 6.0])
    prepare(root / "raw", "ph_btcv", root / "datalist.json", fmt=kind, val_fraction=0.5, test_fraction=0)
    overrides = {f"network_def#{k}": v for k, v in network.items()}
    dirs = run_dirs(kind, root / "datalist.json", tmp_path / "run", patch_size=[patch] * 3, iterations_per_epoch=1)
    wf = workflow(kind, "train", ["train", overlay], **dirs, **overrides)
    assert (
        type(wf.parser.get_parsed_content("network")).__name__ == {"unetr": "UNETR", "swinunetr": "SwinUNETR"}[overlay]
    )
    wf.run()
    wf.finalize()
    assert (tmp_path / "run" / "models" / "model.pt").exists()


@pytest.mark.integration
def test_two_rank_gloo_fine_tuning(pretrained, tmp_path):
    kind = "btcv"
    generate_downstream_phantoms(tmp_path / "raw", kind, cases=6, spacing=PHANTOM_SPACING[kind])
    datalist = tmp_path / "datalist.json"
    # 2 training and 2 validation cases: one of each per rank
    prepare(tmp_path / "raw", "ph_btcv", datalist, fmt=kind, val_fraction=0.5, test_fraction=0.34)
    dirs = run_dirs(kind, datalist, tmp_path / "run", pretrained=str(pretrained))
    args = [f"--{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in dirs.items()]
    folder = BUNDLES / KINDS[kind]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "monai.bundle", "run", "--config_file", json.dumps(configs(kind, "train", "multi_gpu_train")),
           "--meta_file", str(folder / "configs" / "metadata.json"),
           "--logging_file", str(folder / "configs" / "logging.conf"),
           "--bundle_root", str(folder), "--backend", "gloo", *args]  # fmt: skip
    # two ranks write progress bars to one pipe: a multi-byte character can be split between them
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "loaded" in done.stdout + done.stderr  # the transfer report of the pretrained weights
    assert (tmp_path / "run" / "models" / "model.pt").exists()
