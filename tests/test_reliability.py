"""What the project refuses and how it says so (issue 15): check-data's bad datalists and geometries, the header
checks a bundle run makes before caching anything, the non-finite guard of training, and one-line errors for the
most common bundle mistakes (each ≤ 5 lines on stderr, naming the file or id and the fix)."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import monai.bundle
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLES, held_by_another_process

from uniseg_monai.apps.bundles import bundle_workflow
from uniseg_monai.core.errors import InputError, NonFiniteError, UsageError, one_line_errors, user_error
from uniseg_monai.core.locks import LOCK_NAME, FolderInUseError, acquire, release
from uniseg_monai.data.check import check_datalist, check_run_items
from uniseg_monai.data.geometry import geometry_problem, resampled_voxels
from uniseg_monai.engine.checkpoints import ResumeCheckpointLoader, _AtomicDiskSaver
from uniseg_monai.engine.guards import NonFiniteGuard
from uniseg_monai.engine.precision import LossScaling, autocast_kwargs
from uniseg_monai.engine.wiring import registry_for_datalist
from uniseg_monai.model_io.model_files import ModelFileError, load_weights_only

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "uniseg_pretrain"


def absolute(phantoms: Path, item: dict) -> dict:
    return {k: str(phantoms.parent / v) if k in ("image", "label") else v for k, v in item.items()}


@pytest.fixture(scope="module")
def cases(phantoms) -> dict:
    """The phantom datalist's tasks, one ph_organs training case and one validation case (absolute paths)."""
    datalist = json.loads(phantoms.read_text())
    organs = [absolute(phantoms, i) for i in datalist["training"] if i["task"] == "ph_organs"]
    tasks = {"ph_organs": datalist["tasks"]["ph_organs"]}
    return {"tasks": tasks, "train": organs[0], "other": organs[1], "val": organs[2]}


def write(path: Path, content: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


def nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), path)
    return str(path)


def problems(datalist: Path) -> list[str]:
    return [str(p) for p in check_datalist(datalist, progress=False)]


def test_check_data_refuses_what_training_would_fail_on(cases, tmp_path):
    ct = nib.load(cases["train"]["image"])
    coarse = ct.affine.copy()
    coarse[:3, :3] *= 100 / np.linalg.norm(coarse[:3, 0])
    data = ct.get_fdata()
    four_d = nifti(tmp_path / "label4d.nii.gz", np.zeros((*ct.shape, 2)), ct.affine)
    cm = nifti(tmp_path / "cm.nii.gz", data, coarse)
    good, label = cases["train"]["image"], cases["train"]["label"]
    expected = {
        "no_training": ({"validation": [cases["val"]]}, "no training cases: the 'training' section is missing"),
        "no_label": ({"training": [{"image": good, "task": "ph_organs"}]}, "no 'label'"),
        "same_file": (
            {"training": [{"image": good, "label": good, "task": "ph_organs"}]},
            "is the image and the label",
        ),
        "number": ({"training": [{"image": 3, "label": label, "task": "ph_organs"}]}, "'image' must be a file path"),
        "label_4d": ({"training": [{"image": good, "label": four_d, "task": "ph_organs"}]}, "label must be one 3D"),
        "100mm": ({"training": [{"image": cm, "label": label, "task": "ph_organs"}]}, "is outside 0.3-40 mm"),
    }
    for name, (content, marker) in expected.items():
        found = problems(write(tmp_path / f"{name}.json", {"tasks": cases["tasks"], **content}))
        assert any(marker in p for p in found), (name, found)
        assert all("fix:" in p and "fix: fix" not in p for p in found), found
    leak = {"tasks": cases["tasks"], "training": [cases["train"]], "validation": [cases["other"], cases["train"]]}
    found = problems(write(tmp_path / "leak.json", leak))
    assert any(p.startswith(f"{good}: is in both training[0] and validation[1]") for p in found), found


def test_geometry_refuses_singular_affines_and_absurd_spacings(phantoms):
    task = registry_for_datalist(phantoms)["ph_organs"]  # target spacing 3 x 3 x 4 mm
    assert geometry_problem(np.diag([1.0, 1.0, 1.0, 1.0]), task) is None
    assert "singular affine" in geometry_problem(np.diag([1.0, 1.0, 0.0, 1.0]), task)  # a zero pixdim
    assert "singular affine" in geometry_problem(
        np.array([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1.0]]), task
    )
    assert "not a finite" in geometry_problem(np.diag([np.nan, 1.0, 1.0, 1.0]), task)
    assert "outside 0.3-40 mm, the range for task 'ph_organs'" in geometry_problem(np.diag([100.0, 1, 1, 1]), task)
    assert "outside 0.3-40 mm" in geometry_problem(np.diag([0.01, 1, 1, 1]), task)
    assert resampled_voxels((100, 100, 10), np.diag([3.0, 3.0, 8.0, 1.0]), task) == 100 * 100 * 20


def test_a_run_checks_the_headers_of_its_files_first(cases, phantoms, tmp_path):
    registry = registry_for_datalist(phantoms)
    check_run_items([[cases["train"]], [cases["val"]]], registry)  # good items pass
    small = nifti(tmp_path / "small.nii.gz", np.zeros((10, 10, 10)), nib.load(cases["train"]["image"]).affine)
    bad = [
        ({**cases["train"], "image": str(tmp_path / "gone.nii.gz")}, "gone.nii.gz: file not found"),
        ({**cases["train"], "label": small}, "resample the label onto the image grid"),
        ({k: v for k, v in cases["train"].items() if k != "label"}, "no 'label'"),
    ]
    for item, marker in bad:
        with pytest.raises(InputError, match=marker):
            check_run_items([[cases["val"]], [item, item]], registry)
    with pytest.raises(InputError, match=r"\(and 1 more problem\(s\); `uniseg check-data DATALIST`"):
        check_run_items([[bad[0][0], bad[0][0]]], registry)


def test_bundle_inference_checks_image_channels_before_it_writes(cases, phantoms, tmp_path):
    """An image whose channel count is not the task's modalities (2 files as a 1-channel task) is one line before the
    run, and no output folder is made; unlabelled cases and a label-less check pass."""
    from uniseg_monai.engine.wiring import start_inference

    registry = registry_for_datalist(phantoms)
    out = tmp_path / "out"
    unlabelled = {k: v for k, v in cases["train"].items() if k != "label"}
    four = {**unlabelled, "image": [cases["train"]["image"]] * 2}
    with pytest.raises(InputError, match=r"2 channel\(s\), task 'ph_organs' expects 1 .*use the right task"):
        start_inference(out, False, [unlabelled, four], tmp_path / "none.json", tmp_path, "testing", True, registry)
    assert not out.exists()
    assert start_inference(out, False, [unlabelled, cases["val"]], tmp_path / "none.json", tmp_path, registry=registry)


def engine(loss: float, amp: bool = False, iteration: int = 1, grad: float = 1.0) -> SimpleNamespace:
    """The parts of a SupervisedTrainer the guard reads, after a backward pass with gradient ``grad``."""
    network = torch.nn.Linear(2, 1)
    for p in network.parameters():
        p.grad = torch.full_like(p, grad)
    image = torch.zeros(2, 1, 4, 4, 4)
    batch = {"image": image, "task": ["ph_organs", "ph_organs"]}
    state = SimpleNamespace(epoch=1, iteration=iteration, batch=batch, output={"loss": torch.tensor(loss)})
    scaler = torch.amp.GradScaler("cpu") if amp else None  # float16 AMP: MONAI's trainer makes an enabled scaler
    return SimpleNamespace(state=state, network=network, amp=amp, scaler=scaler, amp_kwargs=autocast_kwargs("float16"))


def test_non_finite_guard_stops_before_the_weights_change():
    guard = NonFiniteGuard()
    ok = engine(0.5)
    guard.check_inputs(ok), guard.check_loss(ok), guard.check_gradients(ok)
    nan_input = engine(0.5)
    nan_input.state.batch["image"][0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"1 NaN / Inf voxels in the input batch at epoch 1, iteration 1 "):
        guard.check_inputs(nan_input)
    nan_label = engine(0.5)
    nan_label.state.batch["label"] = torch.zeros(2, 1, 4, 4, 4)
    nan_label.state.batch["label"][1, 0, 1, 1, 1] = float("nan")  # a float label file with NaN voxels
    with pytest.raises(NonFiniteError, match=r"1 NaN / Inf voxels in the input batch at .*these labels"):
        guard.check_inputs(nan_label)
    with pytest.raises(NonFiniteError, match=r"non-finite loss \(nan\) at epoch 1.*task\(s\) ph_organs"):
        guard.check_loss(engine(float("nan")))
    with pytest.raises(NonFiniteError, match=r"non-finite gradient.*the weights were not updated"):
        guard.check_gradients(engine(0.5, grad=float("inf")))


def test_under_amp_only_consecutive_skipped_steps_stop_the_run():
    guard = NonFiniteGuard(max_skipped_steps=3)
    for i, loss in enumerate([float("inf"), float("inf"), 0.5, float("inf"), float("nan")], start=1):
        step = engine(loss, amp=True, iteration=i)
        guard.check_loss(step)  # the scaler skips these steps: no error yet
        guard.count_skipped(step)
    assert guard.skipped == 2  # the finite step reset the count
    last = engine(float("inf"), amp=True, iteration=6)
    guard.check_loss(last)
    with pytest.raises(NonFiniteError, match="3 consecutive steps with non-finite loss or gradients under float16"):
        guard.count_skipped(last)


def test_bfloat16_amp_trains_without_loss_scaling_and_stops_at_the_first_non_finite_loss():
    step = engine(float("inf"), amp=True)
    step.amp_kwargs = autocast_kwargs("bfloat16")
    LossScaling()(step)  # when the run starts
    assert not step.scaler.is_enabled() and step.scaler.scale(torch.tensor(2.0)) == 2.0  # no scaling
    with pytest.raises(NonFiniteError, match=r"non-finite loss \(inf\)"):
        NonFiniteGuard().check_loss(step)
    fp16 = engine(0.5, amp=True)
    LossScaling()(fp16)
    assert fp16.scaler.is_enabled()
    with pytest.raises(UsageError, match=r"--amp_dtype must be one of \['bfloat16', 'float16'\], got 'fp8'"):
        autocast_kwargs("fp8")


TINY_IDS = {"patch_size": [64, 64, 32], "base_features": 4, "iterations_per_epoch": 1, "epochs": 1, "val_interval": 1,
            "num_workers": 0, "cache_rate": 0}  # fmt: skip


def stderr_of_failed_run(configs: str, capsys, **ids) -> str:
    """Run the bundle in this process as `python -m monai.bundle run` does; the stderr it ends with (the hook the
    bundle's ``initialize`` installed formats the uncaught error)."""
    capsys.readouterr()
    files = [str(BUNDLE / "configs" / f"{f}.json") for f in configs.split("+")]
    with pytest.raises(Exception) as failed:
        monai.bundle.run(config_file=files, bundle_root=str(BUNDLE), **{**TINY_IDS, **ids})
    sys.excepthook(failed.type, failed.value, failed.tb)
    return capsys.readouterr().err


@pytest.fixture()
def one_line_hook(monkeypatch):
    """The bundle's hook, undone after the test."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(logging, "_logRecordFactory", logging.getLogRecordFactory())
    monkeypatch.delenv("UNISEG_DEBUG", raising=False)


def test_common_bundle_mistakes_end_in_one_line_naming_the_fix(cases, tmp_path, capsys, one_line_hook):
    """The most common mistakes of a bundle run: each ends in one line naming the file or id and the fix, before
    anything is written into the run folder."""
    data = tmp_path / "data"
    good = {"tasks": cases["tasks"], "training": [cases["train"]], "validation": [cases["val"]]}
    write(data / "datalist.json", good)
    bad = {
        "missing_file": {**good, "training": [{**cases["train"], "image": str(tmp_path / "gone.nii.gz")}]},
        "label_grid": {**good, "training": [{**cases["train"], "label": cases["other"]["label"]}]},
    }
    for name, content in bad.items():
        write(tmp_path / name / "datalist.json", content)
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "datalist.json").write_text('{"training": [')
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "checkpoint_epoch=3.pt").write_bytes(b"an earlier run")
    mistakes = {
        "datalist not JSON": ({"dataset_dir": tmp_path / "json"}, ["json/datalist.json: not valid JSON"]),
        "earlier run": ({"ckpt_dir": earlier}, ["checkpoint_epoch=3.pt from an earlier run", "--resume true"]),
        "nothing to resume": ({"resume": "true"}, ["no checkpoint_epoch=N.pt to resume", "drop --resume"]),
        "bad boolean": ({"resume": "maybe"}, ["--resume takes true or false"]),
        "bad compile": ({"compile": "maybe"}, ["--compile takes true or false"]),
        "bad AMP dtype": ({"amp_dtype": "fp8"}, ["--amp_dtype must be one of ['bfloat16', 'float16'], got 'fp8'"]),
        "patch size": ({"patch_size": [30, 30, 16]}, ["--patch_size [30, 30, 16]", "set --patch_size"]),
        "patch shape": ({"patch_size": [64, 64]}, ["--patch_size must be [x, y, z] positive integers"]),
        "no epochs": ({"epochs": 0}, ["--epochs takes a positive integer, got 0"]),
        "negative epochs": ({"epochs": -1}, ["--epochs takes a positive integer, got -1"]),
        "epochs not a number": ({"epochs": "abc"}, ["--epochs takes a positive integer, got 'abc'"]),
        "no validation interval": ({"val_interval": 0}, ["--val_interval takes a positive integer, got 0"]),
        "no iterations": ({"iterations_per_epoch": 0}, ["--iterations_per_epoch takes a positive integer"]),
        "negative learning rate": ({"learning_rate": -1}, ["--learning_rate must be a number > 0, got -1"]),
        "foreground fraction": ({"foreground_fraction": 2}, ["--foreground_fraction must be a number in [0, 1]"]),
        "negative weight decay": ({"weight_decay": -1}, ["--weight_decay must be a number >= 0, got -1"]),
        "negative workers": ({"num_workers": -1}, ["--num_workers takes an integer >= 0"]),
        "batch beyond memory": ({"batch_size": 10**7}, ["--batch_size 10000000", "one batch needs at least"]),
        "no sliding window batch": ({"sw_batch_size": 0}, ["--sw_batch_size takes a positive integer, got 0"]),
        "unknown task": ({"task": "spleen"}, ["unknown task 'spleen'", "define it in the datalist"]),
        "missing file": (
            {"dataset_dir": tmp_path / "missing_file"},
            ["gone.nii.gz: file not found", "correct the path"],
        ),
        "label grid": ({"dataset_dir": tmp_path / "label_grid"}, ["differ from image", "resample the label"]),
        "no validation": ({"val_interval": 2}, ["--val_interval 2 is more than --epochs 1", "no model.pt"]),
    }
    for i, (name, (ids, markers)) in enumerate(mistakes.items()):
        ids = {"dataset_dir": data, "ckpt_dir": tmp_path / f"run{i}", **ids}
        err = stderr_of_failed_run("train", capsys, **{k: str(v) if isinstance(v, Path) else v for k, v in ids.items()})
        assert len(err.strip().splitlines()) <= 2 and err.startswith("uniseg: error: "), (name, err)
        assert all(marker in err for marker in markers), (name, err)
        if name not in ("datalist not JSON", "earlier run", "unknown task", "bad compile"):  # refused before writing
            assert not Path(ids["ckpt_dir"]).exists() or not any(Path(ids["ckpt_dir"]).iterdir()), name
    assert sorted(p.name for p in earlier.iterdir()) == ["checkpoint_epoch=3.pt"]  # untouched
    err = stderr_of_failed_run("train+evaluate", capsys, dataset_dir=str(data), ckpt_dir=str(tmp_path / "empty"))
    assert "empty: no model with a task table" in err and "uniseg weights" in err
    for configs in ("train+evaluate", "inference"):
        err = stderr_of_failed_run(configs, capsys, dataset_dir=str(data), sw_batch_size=0)
        assert err.startswith("uniseg: error: --sw_batch_size takes a positive integer, got 0"), (configs, err)


def test_a_user_error_is_not_logged_again_before_its_one_line(one_line_hook):
    """ignite's "terminating" line and MONAI's logged exception of a user error stay below INFO: the run ends with
    the one-line message once; other errors are still logged."""
    stream, logger = io.StringIO(), logging.getLogger("uniseg_test_one_line")
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.INFO)
    logger.addHandler(handler)
    one_line_errors()
    try:
        for err in (UsageError("--epochs takes a positive integer"), ValueError("a bug")):
            try:
                raise err
            except Exception as caught:
                logger.error(f"Engine run is terminating due to exception: {caught}")
                logger.exception(f"Exception: {caught}")
    finally:
        logger.removeHandler(handler)
    assert "positive integer" not in stream.getvalue() and stream.getvalue().count("a bug") >= 2


def test_a_run_folder_in_use_by_another_training_is_refused(cases, tmp_path, capsys, one_line_hook):
    data = write(tmp_path / "data" / "datalist.json", {"tasks": cases["tasks"], "training": [cases["train"]]})
    run_dir = tmp_path / "run"
    with held_by_another_process(run_dir, "training") as pid:
        err = stderr_of_failed_run("train", capsys, dataset_dir=str(data.parent), ckpt_dir=str(run_dir))
        assert len(err.strip().splitlines()) <= 2 and f"{run_dir} is in use by another training: pid {pid} " in err
        assert [p.name for p in run_dir.iterdir()] == [LOCK_NAME]  # the second run wrote nothing


@pytest.mark.parametrize("name", ["uniseg_pretrain", "uniseg_finetune_btcv", "uniseg_finetune_vs"])
def test_a_training_without_validation_is_refused_before_reading_data(name, tmp_path, one_line_hook):
    """No validation, no model.pt: refused in ``initialize``, before the datalist is read (there is none here)."""
    configs = BUNDLES / name / "configs"
    ids = {"dataset_dir": str(tmp_path / "none"), "ckpt_dir": str(tmp_path / "run"), "epochs": 4, "val_interval": 5}
    with pytest.raises(Exception) as refused:
        bundle_workflow(configs.parent, "train", ["train"], **ids)
    assert "--val_interval 5 is more than --epochs 4" in str(user_error(refused.value))
    assert not (tmp_path / "run").exists()
    check = next(e for e in json.loads((configs / "train.json").read_text())["initialize"] if "check_validation" in e)
    assert check in json.loads((configs / "multi_gpu_train.json").read_text())["initialize"]  # every rank checks


def test_folder_locks_tell_live_owners_from_gone_ones(tmp_path, caplog):
    folder, live = tmp_path / "run", {"pid": os.getppid(), "host": socket.gethostname(), "what": "training"}
    folder.mkdir()
    lock = folder / LOCK_NAME
    for owner in (live, {**live, "host": "elsewhere"}):  # a live process; one on another host cannot be checked
        lock.write_text(json.dumps(owner))
        with pytest.raises(
            FolderInUseError, match=rf"in use by another training: pid {os.getppid()} on {owner['host']}"
        ):
            acquire(folder, "evaluation")
    lock.write_text(json.dumps({**live, "pid_start": "-1"}))  # that pid now belongs to a later process
    acquire(folder, "evaluation")
    assert "taking over the stale lock" in caplog.text and json.loads(lock.read_text())["pid"] == os.getpid()
    token = json.loads(lock.read_text())["token"]
    acquire(folder, "evaluation")  # again in the owning process: nothing changes
    assert json.loads(lock.read_text())["token"] == token
    release(folder)
    assert not lock.exists() and folder.is_dir()  # the folder was there before


def bundle_command(dataset_dir: Path, ckpt_dir: Path) -> list[str]:
    ids = [str(v) for k, value in TINY_IDS.items() for v in (f"--{k}", json.dumps(value))]
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE / "configs" / "train.json"),
            "--bundle_root", str(BUNDLE), "--dataset_dir", str(dataset_dir), "--ckpt_dir", str(ckpt_dir),
            "--output_dir", str(ckpt_dir / "eval"), *ids]  # fmt: skip


@pytest.mark.integration
def test_a_real_bundle_run_stops_at_nan_images_in_a_few_lines(cases, tmp_path):
    """End to end, as a user runs it: NaN voxels stop training at the first batch (≤ 5 lines on stderr, no model
    written); a missing datalist is one line, and UNISEG_DEBUG=1 brings the traceback back."""
    ct = nib.load(cases["train"]["image"])
    voxels = ct.get_fdata()
    voxels[::7] = np.nan
    nan_file = nifti(tmp_path / "nan_ct.nii.gz", voxels, ct.affine)
    write(
        tmp_path / "nan" / "datalist.json",
        {"tasks": cases["tasks"], "training": [{**cases["train"], "image": nan_file}]},
    )
    env = {k: v for k, v in os.environ.items() if k != "UNISEG_DEBUG"}
    run = subprocess.run(bundle_command(tmp_path / "nan", tmp_path / "run"), capture_output=True, text=True, env=env)
    assert run.returncode != 0 and len(run.stderr.strip().splitlines()) <= 5, run.stderr
    assert "NaN / Inf voxels in the input batch at epoch 1, iteration 1" in run.stderr and nan_file in run.stderr
    assert "Traceback" not in run.stderr + run.stdout and not list((tmp_path / "run").glob("*.pt"))
    debug = subprocess.run(
        bundle_command(tmp_path / "nowhere", tmp_path / "run2"), capture_output=True, text=True,
        env={**env, "UNISEG_DEBUG": "1"},
    )  # fmt: skip
    assert "Traceback" in debug.stderr and "nowhere/datalist.json: datalist not found" in debug.stderr


def test_a_non_finite_model_is_never_written(tmp_path):
    saver = _AtomicDiskSaver(tmp_path, "model.pt")
    saver({"model": {"w": torch.ones(2)}}, "ignored.pt")
    good = (tmp_path / "model.pt").read_bytes()
    with pytest.raises(NonFiniteError, match=r"refusing to write .*model.pt: 1 of 2 weight tensors hold NaN / Inf"):
        saver({"model": {"w": torch.ones(2), "b": torch.tensor([float("nan")])}}, "ignored.pt")
    assert (tmp_path / "model.pt").read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


@pytest.mark.integration
def test_red_team_follow_ups_end_in_one_line(tmp_path):
    """generate-phantoms never replaces a datalist; a model file of garbage bytes and an unreadable latest
    checkpoint are one-line errors naming the file and what to do."""
    (tmp_path / "datalist.json").write_text('{"training": []}')
    command = [sys.executable, "-m", "uniseg_monai", "generate-phantoms", "--out", str(tmp_path)]
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 2 and "--overwrite true" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert (tmp_path / "datalist.json").read_text() == '{"training": []}'
    for garbage in ("hello\n", "abc"):
        (tmp_path / "model.pt").write_text(garbage)
        with pytest.raises(ModelFileError, match=r"model\.pt: not a readable PyTorch file"):
            load_weights_only(tmp_path / "model.pt")
    (tmp_path / "checkpoint_epoch=2.pt").write_bytes(b"PK\x03\x04 truncated")
    loader = ResumeCheckpointLoader(tmp_path, True, {"model": torch.nn.Linear(1, 1)})
    with pytest.raises(UsageError, match=r"checkpoint_epoch=2.pt: not a readable PyTorch file .*previous checkpoint_"):
        loader(None)


def test_a_bug_while_reading_a_checkpoint_keeps_its_traceback(tmp_path, monkeypatch):
    """The resume loader reads through the model files' weights-only reader: an unreadable file is a one-line
    UsageError (above), a bug in the reading code is not disguised as one."""
    torch.save({"model": {}, "trainer": {}}, tmp_path / "checkpoint_epoch=1.pt")

    def bug(*args, **kwargs):
        raise AttributeError("a bug")

    monkeypatch.setattr(torch, "load", bug)
    loader = ResumeCheckpointLoader(tmp_path, True, {"model": torch.nn.Linear(1, 1)})
    with pytest.raises(AttributeError, match="a bug"):
        loader(None)


def test_a_misspelt_bundle_id_on_the_command_line_is_refused_with_the_closest_id():
    """``--epoch 5`` would be a new id nothing reads: refused naming ``--epochs``; real ids, MONAI's own run
    arguments and keyword arguments of a config component pass."""
    from uniseg_monai.core.errors import UsageError, check_command_line_ids

    configs = BUNDLES / "uniseg_pretrain" / "configs"
    files = f"['{configs / 'train.json'}','{configs / 'demo.json'}']"
    ok = ["--config_file", files, "--bundle_root", "x", "--epochs", "2", "--train#trainer#max_epochs=3", "--meta_file",
          "m", "--network_def#dropout", "0.1"]  # fmt: skip
    assert check_command_line_ids(ok)
    for typo, closest in (("--epoch", "--epochs"), ("--val_intervall", "--val_interval")):
        with pytest.raises(UsageError, match=f"^{typo}: no config of the bundle defines this id.*{closest}\\?$"):
            check_command_line_ids([*ok, typo, "5"])
