"""Model files (uniseg_monai.model_io.model_files): official nnU-Net v1 containers as the release saves them (numpy
1.x and 2 pickles, tiny fixture and full-size shapes), refusal of files whose unpickling would run code,
self-describing files and files of earlier versions."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import pytest
import torch
from conftest import shared_path, zyx_to_xyz
from network_outputs import all_heads
from nnunet_v1 import nnunet_v1_container, save_nnunet_v1

from uniseg_monai.core.errors import UniSegError
from uniseg_monai.model_io.model_files import (
    ModelFileError,
    convert_official,
    network_from_file,
    read_model,
    save_model,
)
from uniseg_monai.model_io.official import convert_state_dict
from uniseg_monai.networks import UniSeg, UniSegBackbone
from uniseg_monai.tasks import PAPER_UPSTREAM_TASKS, TaskRegistry, save_model_tasks

SPELLINGS = ["numpy1", "numpy2"]
BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


def full_size_state(name: str) -> dict[str, torch.Tensor]:
    """A state dict with every key and shape of the full-size official model (values: small random numbers)."""
    state = {}
    for line in shared_path(f"fixtures/official_uniseg/{name}").read_text().splitlines():
        key, shape, _ = line.split("\t")
        state[key] = torch.randn(*[int(v) for v in re.findall(r"\d+", shape)]) * 0.01
    return state


def max_relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return (ours - ref).abs().max().item() / max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_official_release_container_converts_with_either_numpy(official_fixture, tmp_path, spelling):
    """The release's container (training state with numpy scalars) is refused by plain weights_only loading, read
    with the numpy allow-list, and its conversion reproduces the official outputs."""
    src = save_nnunet_v1(nnunet_v1_container(official_fixture["upstream_state_dict"]), tmp_path / "x.model", spelling)
    with zipfile.ZipFile(src) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    assert (b"numpy.core.multiarray" in data) == (spelling == "numpy1")  # the spelling the test claims
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(src, weights_only=True)

    report = convert_official(src, tmp_path / "converted.pt")
    assert report["kind"] == "upstream" and report["tasks"] == list(PAPER_UPSTREAM_TASKS)
    assert "non-commercial" in report["licence"]
    network, model = network_from_file(tmp_path / "converted.pt")
    assert model.tasks.names == list(PAPER_UPSTREAM_TASKS) and model.provenance["source_sha256"]
    for case in official_fixture["upstream_cases"]:
        outputs = all_heads(network, zyx_to_xyz(case["input"]), case["task_id"])
        for ours, ref in zip(outputs, case["outputs"]):
            assert max_relative_error(zyx_to_xyz(ours), ref) <= 1e-5


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_full_size_release_container_has_the_paper_network(tmp_path, spelling):
    state = full_size_state("official_upstream_state_dict_keys.txt")
    src = save_nnunet_v1(nnunet_v1_container(state), tmp_path / "model_final_checkpoint.model", spelling)
    model = read_model(src)
    paper = UniSeg()
    assert model.official and model.network_def == paper.network_def()
    assert {k: v.shape for k, v in model.state.items()} == {k: v.shape for k, v in paper.state_dict().items()}
    paper.load_state_dict(model.state, strict=True)  # every tensor name and shape of the paper network
    assert model.tasks.names == list(PAPER_UPSTREAM_TASKS)


def test_data_parallel_prefix_is_accepted(official_fixture, tmp_path):
    state = {f"module.{k}": v for k, v in official_fixture["downstream_state_dict"].items()}
    src = save_nnunet_v1(nnunet_v1_container(state), tmp_path / "ddp.model")
    model = read_model(src)
    expected = convert_state_dict(official_fixture["downstream_state_dict"])
    assert model.state.keys() == expected.keys() and model.network_def["_target_"].endswith("UniSegBackbone")


class CreatesAFile:
    """Unpickling this opens (and so creates) a file: code that must never run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.integration
@pytest.mark.parametrize("command", ["convert-official", "weights", "predict"])
def test_code_in_a_checkpoint_is_refused_and_never_runs(official_fixture, tmp_path, command):
    marker = tmp_path / "ran.txt"
    container = nnunet_v1_container(official_fixture["upstream_state_dict"])
    container["amp_grad_scaler"] = CreatesAFile(marker)
    src = save_nnunet_v1(container, tmp_path / "evil.model", "numpy1")
    bundle = shutil.copytree(BUNDLES / "uniseg_pretrain", tmp_path / "bundle")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    args = {
        "convert-official": [str(src), str(tmp_path / "out.pt")],
        "weights": ["--bundle", str(bundle), "--url", src.as_uri()],
        "predict": ["-i", str(src), "-o", str(tmp_path / "seg"), "--task", "liver", "--checkpoint", str(src)],
    }[command]
    run = subprocess.run(
        [sys.executable, "-m", "uniseg_monai", command, *args], capture_output=True, text=True, cwd=tmp_path
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    source = src.as_uri() if command == "weights" else str(src)
    assert "refused" in run.stderr and "io.open" in run.stderr and source in run.stderr
    assert not marker.exists()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written or left


def test_a_model_file_describes_its_network_and_tasks(tmp_path):
    tasks = TaskRegistry().subset(["liver", "spleen"])
    net = UniSeg(num_tasks=tasks.num_tasks, num_classes=3, patch_size=(64, 64, 16), features=(4, 8, 16, 16, 16, 16))
    save_model(tmp_path / "anywhere" / "weights.pt", net.state_dict(), net.network_def(), tasks)
    rebuilt, model = network_from_file(tmp_path / "anywhere" / "weights.pt")
    assert model.tasks.to_json() == tasks.to_json() and not model.official
    assert rebuilt.network_def() == net.network_def()
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("layout", ["bare state dict", "model key"])
def test_files_written_before_self_description_keep_working(tmp_path, layout):
    tasks = TaskRegistry().subset(["btcv"])
    net = UniSegBackbone(num_classes=14, features=(4, 8, 16, 16, 16, 16))
    torch.save(net.state_dict() if layout == "bare state dict" else {"model": net.state_dict()}, tmp_path / "model.pt")
    assert read_model(tmp_path / "model.pt").tasks is None
    save_model_tasks(tasks, tmp_path)  # the tasks.json training wrote beside model.pt
    model = read_model(tmp_path / "model.pt")
    assert model.tasks.to_json() == tasks.to_json() and model.network_def is None
    with pytest.raises(ModelFileError, match="no network_def"):
        network_from_file(tmp_path / "model.pt")


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"not a torch file", "not a readable PyTorch file"), (None, "not found"), ({"x": 1}, "not a model file")],
)
def test_unreadable_files_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "model.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(ModelFileError, match=message) as err:
        read_model(path)
    assert str(path) in str(err.value)


def test_a_folder_given_as_the_model_file_says_so(tmp_path, monkeypatch, capsys):
    """convert-official SRC (and every reader) given a folder: one line saying it is a folder, not "not found"."""
    from uniseg_monai.cli import main

    with pytest.raises(SystemExit) as done:
        main(["convert-official", str(tmp_path), "--dst", str(tmp_path / "x.pt")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and lines == [
        f"uniseg: error: {tmp_path} is a folder; give the model file in it, e.g. {tmp_path / 'model.pt'}"
    ]
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("kind", ["official container", "self-describing file"])
def test_non_finite_weights_are_refused_when_read_naming_the_tensor(official_fixture, tmp_path, capsys, kind):
    """A model file with NaN / Inf weights (training never writes one) is refused wherever it is read (convert,
    install, export, predict: all read through read_model), one line naming the file and the tensor; nothing
    written."""
    from uniseg_monai.cli import main

    path = tmp_path / "nan.model"
    if kind == "official container":
        state = {k: v.clone() for k, v in official_fixture["upstream_state_dict"].items()}
        key = [k for k, v in state.items() if v.is_floating_point()][3]
        state[key][0] = float("inf")
        torch.save({"state_dict": state}, path)
        command = ["convert-official", str(path), "--dst", str(tmp_path / "out.pt")]
    else:
        _two_task_file(path, {"a": _task(0), "b": _task(1)})
        saved = torch.load(path, weights_only=True)
        key = list(saved["model"])[5]
        saved["model"][key][:] = float("nan")
        torch.save(saved, path)
        command = ["export", "--checkpoint", str(path), "--onnx", str(tmp_path / "out.onnx")]
    with pytest.raises(ModelFileError, match=re.escape(f"{path}: 1 of ")) as err:
        read_model(path)
    assert f"weight tensors hold NaN / Inf (first: {key})" in str(err.value)
    with pytest.raises(SystemExit) as done:
        main(command)
    assert done.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [f"uniseg: error: {err.value}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.model"]


@pytest.mark.integration
def test_converted_official_file_predicts_without_tasks_json(official_fixture, tmp_path):
    """The reported failure: `uniseg convert-official SRC DST` then `uniseg predict --checkpoint DST`, from a folder
    that is not the repository, with no tasks.json beside DST."""
    src = save_nnunet_v1(nnunet_v1_container(official_fixture["upstream_state_dict"]), tmp_path / "off.model")
    dst = tmp_path / "elsewhere" / "uniseg.pt"
    converted = subprocess.run(
        [sys.executable, "-m", "uniseg_monai", "convert-official", str(src), str(dst)], capture_output=True, text=True
    )
    assert converted.returncode == 0, converted.stderr
    assert "non-commercial" in converted.stderr  # the weights' licence is printed
    ct = shared_path("data/real_samples/totalseg_examples/ct_abdomen_3mm_crop.nii.gz")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "uniseg_monai", "predict", "-i", str(ct), "-o", "seg", "--task", "spleen",
         "--checkpoint", str(dst), "--device", "cpu"],
        capture_output=True, text=True, cwd=cwd,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    seg, image = nib.load(cwd / "seg" / "ct_abdomen_3mm_crop_spleen.nii.gz"), nib.load(ct)
    assert seg.shape == image.shape and (seg.affine == image.affine).all()
    sidecar = json.loads((cwd / "seg" / "ct_abdomen_3mm_crop_spleen.json").read_text())
    assert "non-commercial" in sidecar["weights_licence"] and sidecar["checkpoint"] == str(dst.resolve())


@pytest.mark.integration
@pytest.mark.parametrize(
    "network_def",
    [
        {"_target_": "os.system", "command": "touch MARKER"},
        "$__import__('os').system('touch MARKER')",
        {"_target_": "uniseg_monai.networks.UniSeg", "features": "$__import__('os').system('touch MARKER') or [8]"},
    ],
)
def test_config_code_in_a_network_def_is_refused_unevaluated(official_fixture, tmp_path, network_def):
    """weights_only guards the unpickling; the network description must not smuggle MONAI config code either."""
    marker = tmp_path / "ran.txt"
    src = save_nnunet_v1(nnunet_v1_container(official_fixture["upstream_state_dict"]), tmp_path / "official.model")
    convert_official(src, tmp_path / "good.pt")
    saved = torch.load(tmp_path / "good.pt", weights_only=True)
    saved["network_def"] = json.loads(json.dumps(network_def).replace("MARKER", str(marker)))
    torch.save(saved, tmp_path / "evil.pt")
    with pytest.raises(ModelFileError, match="refused unevaluated"):
        read_model(tmp_path / "evil.pt")
    ct = shared_path("data/real_samples/totalseg_examples/ct_abdomen_3mm_crop.nii.gz")
    run = subprocess.run(
        [sys.executable, "-m", "uniseg_monai", "predict", "-i", str(ct), "-o", str(tmp_path / "seg"), "--task",
         "liver", "--checkpoint", str(tmp_path / "evil.pt"), "--device", "cpu"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 2 and "refused unevaluated" in run.stderr and "Traceback" not in run.stderr
    assert not marker.exists()


def _two_task_file(path: Path, tasks: dict) -> Path:
    """A random-weight 2-task, 3-class UniSeg model file with the task table ``tasks`` (raw JSON)."""
    net = UniSeg(num_tasks=2, num_classes=3, patch_size=(32, 32, 16), features=[4, 8, 16, 32, 64, 128])
    torch.save({"model": net.state_dict(), "network_def": net.network_def(), "tasks": tasks}, path)
    return path


def _task(task_id: int, classes: int = 3) -> dict:
    return {"id": task_id, "modalities": ["CT"], "labels": [f"c{i}" for i in range(classes)], "spacing": [1, 1, 1]}


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ({"a": _task(0), "b": _task(2)}, "task 'b' id 2, but the network has 2 task slot(s) (ids 0-1)"),
        ({"a": _task(0), "b": _task(1, classes=6)}, "task 'b' has 6 labels, but the network outputs 3 classes"),
        ({"a": _task(0), "b": _task(0)}, "tasks 'a' and 'b' share id 0"),
        ({"Liver": _task(0), "liver": _task(1)}, "tasks 'Liver' and 'liver' differ only in letter case"),
        ("liver", "\"tasks\" must map task names to task definitions, got a str 'liver'; a model's task table is {"),
        ([1, 2], '"tasks" must map task names to task definitions, got a list [1, 2]; a model\'s task table is {'),
        ({"a": _task(0), "b": 1}, "task 'b' must be a task definition, an object such as {\"id\": 0, "),
        ({"a": _task(0), "b": {**_task(1), "id": True}}, "task 'b': id must be an integer from 0 to 1023, got True"),
        ({"a": _task(0), "b": {**_task(1), "spacing": [1e-6] * 3}}, "task 'b': spacing must be 3 positive numbers"),
    ],
)
def test_a_task_table_that_does_not_fit_its_network_is_refused_when_read(tmp_path, tasks, message):
    """Task ids beyond the network's slots, more labels than its outputs, two tasks on one id (maps with wrong label
    meanings), names colliding on case-insensitive file systems, a table that is no mapping: one line naming the
    file, when it is read (not per case)."""
    path = _two_task_file(tmp_path / "model.pt", tasks)
    with pytest.raises(ModelFileError) as err:
        read_model(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"hello world, no pickle\n" * 4, "invalid data: neither a PyTorch zip archive nor a pickle"), (b"", "empty")],
)
def test_an_unreadable_file_says_why_in_words(tmp_path, content, reason):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=f"garbage.pt: not a readable PyTorch file \\({reason}"):
        read_model(path)


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ("my_new_task", "--task 'my_new_task' is not a built-in task with 14 classes (those: ['btcv'])"),
        ("../evil", "--task: task name '../evil': use letters"),
    ],
)
def test_a_downstream_conversion_names_what_is_wrong_with_its_task(official_fixture, tmp_path, task, message):
    src = save_nnunet_v1(nnunet_v1_container(official_fixture["downstream_state_dict"]), tmp_path / "down.model")
    with pytest.raises(UniSegError, match=re.escape(message)) as err:
        convert_official(src, tmp_path / "x.pt", task=task)
    assert "name its task with --task" not in str(err.value) and not (tmp_path / "x.pt").exists()
    if task == "my_new_task":  # the way the message gives: a tasks.json beside SRC
        (tmp_path / "tasks.json").write_text(json.dumps({"tasks": {task: _task(0, classes=14)}}))
        assert convert_official(src, tmp_path / "x.pt")["tasks"] == [task]


@pytest.mark.parametrize("kind", ["upstream", "downstream with a tasks.json"])
def test_a_conversion_refuses_a_task_it_would_ignore(official_fixture, tmp_path, kind):
    """--task with an upstream checkpoint (its tasks are the paper's) or beside a tasks.json (that file says the
    task): one line saying why and to drop it, nothing written (the option was silently ignored); the task the
    tasks.json names is accepted."""
    name = "upstream_state_dict" if kind == "upstream" else "downstream_state_dict"
    src = save_nnunet_v1(nnunet_v1_container(official_fixture[name]), tmp_path / "x.model")
    expected = "is an upstream checkpoint: its tasks are the paper's 11 (liver, "
    if kind != "upstream":
        spec = {"id": 0, "modalities": ["CT"], "labels": [f"c{i}" for i in range(14)], "spacing": [1.5, 1.5, 3]}
        (tmp_path / "tasks.json").write_text(json.dumps({"tasks": {"mine": spec}}))
        expected = f"the tasks.json beside {src} defines its task (mine), so --task would be ignored; drop --task"
        assert convert_official(src, tmp_path / "ok.pt", task="mine")["tasks"] == ["mine"]
    with pytest.raises(UniSegError, match=re.escape(f"--task 'btcv': {expected if kind != 'upstream' else ''}")) as err:
        convert_official(src, tmp_path / "x.pt", task="btcv")
    assert expected in str(err.value) and "\n" not in str(err.value) and not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ({"mine": _task(0, classes=3)}, "task 'mine' has 3 labels, but the network outputs 14 classes"),
        (
            {"t1": _task(0, classes=14), "t2": _task(1, classes=14)},
            "has 2 tasks (t1, t2), but the network is a one-task",
        ),
    ],
)
def test_a_task_table_that_does_not_fit_a_one_task_network_is_refused(official_fixture, tmp_path, tasks, message):
    """A one-task (downstream) network takes one task with exactly its class count: fewer labels would write values
    the sidecar does not name, a second task would run the first's network with other normalisation."""
    src = save_nnunet_v1(nnunet_v1_container(official_fixture["downstream_state_dict"]), tmp_path / "down.model")
    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": tasks}))
    with pytest.raises(ModelFileError, match=re.escape(message)) as err:
        convert_official(src, tmp_path / "x.pt")
    assert "tasks.json beside it" in str(err.value) and not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"features": [-8] * 6}, "network_def field 'features' must hold whole numbers from 1 to 4096"),
        ({"features": [4.5, 8, 16, 32, 64, 128]}, "network_def field 'features' must hold whole numbers"),
        ({"num_classes": float("nan")}, "network_def field 'num_classes' must hold whole numbers"),
        ({"num_tasks": 10**12}, "network_def field 'num_tasks' must hold whole numbers from 1 to 4096"),
        ({"strides": [[1, 1, 1]]}, "network_def field 'strides' must be a list with one entry per stage"),
        ({"patch_size": [30, 32, 16]}, "its network_def does not describe a buildable network (patch_size"),
        ({"num_tasks": 3}, "its weights do not match the network its network_def describes (6 tensor shape(s) differ"),
        ({"model": {"bogus.weight": torch.zeros(3)}}, "(1 unexpected, e.g. bogus.weight)"),
        ({"model": {"universal_prompt": None}}, "(1 tensor(s) missing, e.g. universal_prompt)"),
    ],
)
def test_a_network_def_or_weights_that_are_not_a_network_are_refused_when_read(tmp_path, change, message):
    """Invalid numbers in a network_def, and tensors that disagree with the file's own network_def: one line naming
    the file and the field or tensors, checked on the meta device before anything is allocated."""
    path = _two_task_file(tmp_path / "model.pt", {"a": _task(0), "b": _task(1)})
    saved = torch.load(path, weights_only=True)
    state = {**saved["model"], **change.pop("model", {})}
    saved["model"] = {k: v for k, v in state.items() if v is not None}
    saved["network_def"].update(change)
    torch.save(saved, path)
    with pytest.raises(ModelFileError) as err:
        read_model(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value) and "\n" not in str(err.value)


def test_an_older_file_that_does_not_fit_names_every_setting_its_tensors_show(tmp_path):
    """A state dict without network_def (an earlier version's file) loaded into a network built with other settings:
    the one line names every network_def id that differs, read off the tensors (patch_size too: it decides the
    universal prompt's shape), with the options that fix them."""
    from uniseg_monai.model_io.model_files import inferred_network_def, load_into

    small = {"features": [4, 8, 16], "kernel_sizes": [[3, 3, 1], [3, 3, 3], [3, 3, 3]],
             "strides": [[1, 1, 1], [2, 2, 1], [2, 2, 2]], "patch_size": [16, 16, 8]}  # fmt: skip
    trained = UniSeg(num_tasks=3, num_classes=2, **small)
    assert inferred_network_def(trained.state_dict()) == {
        k: v for k, v in trained.network_def().items() if k not in ("_target_", "in_channels", "fuse_blocks")
    }
    torch.save(trained.state_dict(), tmp_path / "model.pt")
    other = UniSeg(num_tasks=3, num_classes=2, features=[4, 8, 32], patch_size=[32, 32, 16],
                   kernel_sizes=small["kernel_sizes"], strides=small["strides"])  # fmt: skip
    with pytest.raises(ModelFileError) as caught:
        load_into(other, tmp_path / "model.pt")
    line = str(caught.value)
    assert "\n" not in line and "features: file [4, 8, 16] vs config [4, 8, 32]" in line
    assert "patch_size: file [16, 16, 8] vs config [32, 32, 16]" in line
    assert "pass --base_features 4 --patch_size [16,16,8]" in line
    assert "kernel_sizes" not in line and "strides" not in line and "num_tasks" not in line  # only what differs
