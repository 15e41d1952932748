"""``uniseg add-task``: a grown UniSeg computes exactly what the original did for its tasks (official fixture, a
model trained through the bundle), before and after prompt-mode training; decoder / full modes train what they say;
the new model works with evaluate, predict --task all and TorchScript; bad input is one clear error and the base
model is never written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import PREDICT_BUNDLE, zyx_to_xyz
from network_outputs import all_heads

from uniseg_monai.apps.add_task import TaskExtension, add_task, grow_network
from uniseg_monai.apps.predict import predict
from uniseg_monai.cli import main
from uniseg_monai.core.errors import UsageError
from uniseg_monai.model_io.model_files import build_network, load_into, network_from_file, read_model, save_model
from uniseg_monai.model_io.official import convert_state_dict, infer_network_def
from uniseg_monai.networks import UniSeg
from uniseg_monai.tasks import TaskRegistry

NEW = "ph_tumour6"  # ph_liver's cases as a new task with 6 classes (more than the phantom models' 4 heads)


def official_upstream(fixture: dict) -> UniSeg:
    state = fixture["upstream_state_dict"]
    net = build_network(infer_network_def(state))
    net.load_state_dict(convert_state_dict(state), strict=True)
    return net.eval()


def assert_same_old_outputs(grown: UniSeg, base: UniSeg, x: torch.Tensor, classes: dict[int, int]) -> None:
    """Every deep-supervision output of every old task id, its classes, bit for bit."""
    for task, k in classes.items():
        for ours, ref in zip(all_heads(grown, x, task), all_heads(base, x, task)):
            assert torch.equal(ours[:, :k], ref[:, :k]), (task, (ours[:, :k] - ref[:, :k]).abs().max())


@pytest.mark.exactness
def test_growing_the_official_fixture_keeps_every_old_output_bit_identical(official_fixture):
    base = official_upstream(official_fixture)
    grown = grow_network(base, num_classes=6)  # a new task with more classes than the 4 heads
    assert (grown.num_tasks, grown.num_classes, grown.class_groups) == (12, 6, [4, 2])
    assert grown.network_def()["added_tasks"] == 1 and grown.universal_prompt.shape[1] == 12
    for case in official_fixture["upstream_cases"]:
        x = zyx_to_xyz(case["input"])
        assert_same_old_outputs(grown, base, x, {int(case["task_id"]): 4})
    x = zyx_to_xyz(official_fixture["upstream_cases"][0]["input"])
    assert_same_old_outputs(grown, base, x, {t: 4 for t in range(11)})
    other_size = torch.randn(1, 1, 128, 128, 32)  # a window of another size: the prompt is resampled
    assert_same_old_outputs(grown, base, other_size, {0: 4, 7: 4})
    assert not torch.equal(grown.eval()(x, 11), grown(x, 0))  # the new task has its own prompt

    twice = grow_network(grown, num_classes=3)  # a second task: the first added one keeps its numbers too
    assert twice.num_tasks == 13 and twice.class_groups == [4, 2]
    assert_same_old_outputs(twice, grown, x, {0: 4, 11: 6})
    scripted = torch.jit.script(twice.eval())
    assert torch.equal(scripted(x, torch.tensor([12])), twice(x, 12))


@pytest.mark.exactness
def test_growing_a_multiple_prompts_variant():
    base = UniSeg(num_tasks=2, num_classes=3, patch_size=(32, 32, 16), features=(4, 8, 16), kernel_sizes=[3] * 3,
                  strides=[1, 2, 2], prompt="multiple").eval()  # fmt: skip
    grown = grow_network(base, num_classes=3)
    assert grown.universal_prompt.shape[1] == 3 and len(grown.task_extensions) == 0
    assert_same_old_outputs(grown, base, torch.randn(1, 1, 32, 32, 16), {0: 3, 1: 3})


@pytest.fixture(scope="module")
def new_task_datalist(phantoms, tmp_path_factory) -> Path:
    """The phantom datalist with ``NEW``: ph_liver's cases (2 training, 1 validation) under a 6-class task."""
    data = json.loads(phantoms.read_text())
    data["tasks"][NEW] = {**data["tasks"]["ph_liver"], "labels": ["background", "liver", "tumour", "a", "b", "c"]}
    data["tasks"][NEW].pop("id", None)
    for section, n in (("training", 2), ("validation", 1)):
        chosen = [dict(i, task=NEW) for i in data[section] if i["task"] == "ph_liver"][:n]
        data[section] = data[section] + chosen
    for section in ("training", "validation", "testing"):
        for item in data[section]:
            for key in ("image", "label"):
                value = item.get(key)
                if value is not None:
                    item[key] = [str(phantoms.parent / v) for v in value] if isinstance(value, list) else str(
                        phantoms.parent / value)  # fmt: skip
    path = tmp_path_factory.mktemp("add_task") / "datalist.json"
    path.write_text(json.dumps(data))
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_add(predict_model: Path, datalist: Path, out: Path, mode: str, iterations: int = 2, **kwargs) -> dict:
    ids = {"epochs": 1, "iterations_per_epoch": iterations, "val_interval": 1, "num_workers": 0, "cache_rate": 0.0}
    return add_task(str(datalist), NEW, str(PREDICT_BUNDLE), mode, str(out), str(predict_model), **{**ids, **kwargs})


@pytest.fixture(scope="module")
def prompt_run(predict_model, new_task_datalist, tmp_path_factory) -> tuple[Path, dict, str]:
    before = sha(predict_model)
    out = tmp_path_factory.mktemp("prompt") / "models"
    return out, run_add(predict_model, new_task_datalist, out, "prompt"), before


@pytest.mark.exactness
def test_prompt_mode_trains_only_new_parts_and_old_tasks_stay_bit_identical(predict_model, prompt_run, phantoms):
    out, report, before = prompt_run
    assert sha(predict_model) == before  # the base model is only read
    base, base_file = network_from_file(predict_model)
    grown, grown_file = network_from_file(out / "model.pt")
    assert grown_file.tasks.names == [*base_file.tasks.names, NEW] and grown_file.tasks[NEW].id == 4
    assert json.loads((out / "tasks.json").read_text())["tasks"][NEW]["id"] == 4
    assert grown_file.provenance["added_tasks"] == [{"task": NEW, "mode": "prompt", "base_model_sha256": before}]
    assert report["old_tasks_max_abs_logit_change"] == {name: 0.0 for name in base_file.tasks.names}
    assert report["trained_on"] == [NEW]  # prompt mode: old tasks' cases cannot change what it trains
    # what trained: the new FUSE filter, the new prompt channel and the new head rows, nothing else
    base_state, state = base.state_dict(), grown.state_dict()
    changed = sorted(k for k in state if k not in base_state or not torch.equal(
        state[k][tuple(slice(0, n) for n in base_state[k].shape)], base_state[k]))  # fmt: skip
    assert changed and all(k.startswith("task_extensions.0.") for k in changed)
    x = torch.randn(1, 1, 64, 64, 32)
    assert_same_old_outputs(grown.eval(), base.eval(), x, {t.id: t.num_classes for t in base_file.tasks.values()})
    assert report["trainable_parameters"] == sum(
        p.numel() for k, p in grown.state_dict().items() if k.startswith("task_extensions.")
    ) + 2 * 2 * 2 + 2 * sum(grown.init_args["features"][:-1])  # the prompt channel (2x2x2), 2 new rows per head


def test_the_grown_model_works_with_evaluate_predict_all_and_export(prompt_run, phantoms, tmp_path):
    from monai.bundle import ConfigParser

    out = prompt_run[0]
    for configs in (["train.json", "evaluate.json"], ["inference.json"]):  # MONAI Label uses train / inference
        parser = ConfigParser()
        parser.read_config([str(PREDICT_BUNDLE / "configs" / f) for f in configs])
        parser.update({"bundle_root": str(PREDICT_BUNDLE), "ckpt_dir": str(out), "base_features": 4,
                       "patch_size": [64, 64, 32], "dataset_dir": str(tmp_path)})  # fmt: skip
        load_into(parser.get_parsed_content("network_def"), out / "model.pt")  # the bundle's config builds it

    ct = phantoms.parent / "abdomen" / "abdomen_009_ct.nii.gz"
    assert predict(str(ct), str(tmp_path / "pred"), "all", bundle=str(PREDICT_BUNDLE), checkpoint=str(out / "model.pt"),
                   device="cpu") == 0  # fmt: skip
    written = {p.name for p in (tmp_path / "pred").glob("*.nii.gz")}
    assert f"abdomen_009_ct_{NEW}.nii.gz" in written and "abdomen_009_ct_ph_organs.nii.gz" in written


@pytest.mark.parametrize(("mode", "rehearse"), [("decoder", False), ("full", True)])
def test_decoder_and_full_modes_train_what_they_say(predict_model, new_task_datalist, tmp_path, mode, rehearse):
    # decoder: --val_interval above --epochs, so no validation picks a model: model.pt holds the final weights
    extra = {"rehearse": rehearse} if rehearse else {"rehearse": rehearse, "val_interval": 2}
    report = run_add(predict_model, new_task_datalist, tmp_path / "models", mode, iterations=1, **extra)
    old = ["ph_organs", "ph_liver", "ph_brain", "ph_petct"]
    assert report["trained_on"] == [NEW, *old] if rehearse else [NEW]  # rehearsal: the old tasks' cases too
    base = network_from_file(predict_model)[0].state_dict()
    grown = network_from_file(tmp_path / "models" / "model.pt")[0].state_dict()
    same = {k: torch.equal(grown[k][tuple(slice(0, n) for n in v.shape)], v) for k, v in base.items()}
    assert all(same[k] for k in base if k.startswith(("encoder.", "bottleneck."))) == (mode == "decoder")
    assert not all(same[k] for k in base if k.startswith("decoder."))
    assert all(same[k] for k in base if k.startswith("fuse.")) == (mode == "decoder")
    assert max(report["old_tasks_max_abs_logit_change"].values()) > 0  # reported, not hidden


@pytest.fixture
def base_file(tmp_path) -> Path:
    net = UniSeg(num_tasks=2, num_classes=3, patch_size=(32, 32, 16), in_channels=(1,), features=(4, 8, 16),
                 kernel_sizes=[3] * 3, strides=[1, 2, 2])  # fmt: skip
    tasks = {"ct_a": {"id": 0, "modalities": ["CT"], "labels": ["bg", "a", "b"], "spacing": [1, 1, 1]},
             "ct_b": {"id": 1, "modalities": ["CT"], "labels": ["bg", "c"], "spacing": [1, 1, 1]}}  # fmt: skip
    path = tmp_path / "base" / "model.pt"
    path.parent.mkdir()
    save_model(path, net.state_dict(), net.network_def(), TaskRegistry().extended(tasks).subset(["ct_a", "ct_b"]))
    return path


def datalist_with(tmp_path: Path, tasks: dict, training: list[str]) -> Path:
    path = tmp_path / "datalist.json"
    items = [{"image": "ct.nii.gz", "label": "seg.nii.gz", "task": t} for t in training]
    path.write_text(json.dumps({"tasks": tasks, "training": items}))
    return path


NEW_CT = {"modalities": ["CT"], "labels": ["bg", "x"], "spacing": [1, 1, 1]}


@pytest.mark.parametrize(
    ("tasks", "task", "training", "message"),
    [
        ({"ct_a": NEW_CT}, "ct_a", ["ct_a"], "'ct_a' is already task 0 of"),
        ({}, "ct_new", ["ct_new"], "task 'ct_new' is not defined: add it to the datalist's \"tasks\""),
        ({"ct_new": NEW_CT}, "ct_new", ["ct_a"], "no training cases of task 'ct_new'"),
        ({"pet_ct": {**NEW_CT, "modalities": ["CT", "PET"]}}, "pet_ct", ["pet_ct"], "has modality stems for [1]"),
        ({"bad": {**NEW_CT, "spacing": [1, 1]}}, "bad", ["bad"], "spacing must be 3 positive numbers"),
        ({"all": NEW_CT}, "all", ["all"], "task name 'all': use letters"),
        ({"../up": NEW_CT}, "../up", ["../up"], "task name '../up': use letters"),
    ],
)
def test_bad_tasks_are_one_clear_error_and_the_base_is_untouched(base_file, tmp_path, tasks, task, training, message):
    before = sha(base_file)
    datalist = datalist_with(tmp_path, tasks, training)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        TaskExtension(base_file, datalist, task, "prompt", str(tmp_path / "new"))
    assert sha(base_file) == before and not (tmp_path / "new").exists()


def test_refused_settings(base_file, tmp_path, capsys):
    datalist = datalist_with(tmp_path, {"ct_new": NEW_CT}, ["ct_new"])
    with pytest.raises(UsageError, match=r"--mode \(bundle id add_mode\) must be one of"):
        TaskExtension(base_file, datalist, "ct_new", "prompts", str(tmp_path / "new"))
    with pytest.raises(UsageError, match=r"holds the base model model\.pt"):
        TaskExtension(base_file, datalist, "ct_new", "prompt", str(base_file.parent))
    backbone = tmp_path / "backbone.pt"
    net = build_network(
        {
            "_target_": "uniseg_monai.networks.UniSegBackbone",
            "num_classes": 3,
            "features": [4, 8],
            "kernel_sizes": [3, 3],
            "strides": [1, 2],
        }
    )
    save_model(backbone, net.state_dict(), net.network_def(), read_model(base_file).tasks.subset(["ct_a"]))
    with pytest.raises(UsageError, match="tasks can be added to a UniSeg model with its network_def only"):
        TaskExtension(backbone, datalist, "ct_new", "prompt", str(tmp_path / "new"))
    with pytest.raises(SystemExit) as exit_info:  # the command line: one line, exit 2, before anything is written
        main(["add-task", "--datalist", str(datalist), "--task", "ct_new", "--bundle", str(PREDICT_BUNDLE),
              "--checkpoint", str(base_file), "--out", str(tmp_path / "new"), "--epoch", "3"])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("uniseg: error: unknown bundle setting(s) ['epoch']") and len(err.splitlines()) == 1
    for option, message in (("--patch_size=[64,64,32]", "--patch_size: the network is the base model's"),
                            ("--ckpt_dir=x", "--ckpt_dir: set by uniseg add-task (--out"),
                            ("--epochs=0", "--epochs must be a whole number >= 1, got 0")):  # fmt: skip
        with pytest.raises(SystemExit):
            main(["add-task", "--datalist", str(datalist), "--task", "ct_new", "--bundle", str(PREDICT_BUNDLE),
                  "--checkpoint", str(base_file), "--out", str(tmp_path / "new"), option])  # fmt: skip
        assert message in capsys.readouterr().err
    for args in (["ct_new", "--bundle", str(PREDICT_BUNDLE)], ["--datalist", str(datalist)]):  # a name as positional
        with pytest.raises(SystemExit):
            main(["add-task", *args])
        err = capsys.readouterr().err.strip()
        assert err.startswith("uniseg: error: give the datalist that defines the task") and "--task NAME" in err
    with pytest.raises(UsageError, match="is a folder: pass the model file"):
        add_task(str(datalist), "ct_new", str(PREDICT_BUNDLE), checkpoint=str(base_file.parent))
    with pytest.raises(ValueError, match=r"^--task: task name '\.\./up': use letters"):  # before <bundle>/models_../up
        add_task(str(datalist), "../up", str(PREDICT_BUNDLE), checkpoint=str(base_file))
    assert not (tmp_path / "new").exists()


def test_install_replaces_the_bundle_model_keeping_backups(prompt_run, predict_model, tmp_path):
    from uniseg_monai.apps.add_task import install

    models = tmp_path / "models"
    models.mkdir()
    for name in ("model.pt", "tasks.json"):
        (models / name).write_bytes((predict_model.parent / name).read_bytes())
    backups = install(prompt_run[0], models)
    assert sorted(p.name.split("_before_")[0] for p in backups) == ["model", "tasks"]
    for backup in backups:
        original = predict_model.parent / (backup.name.split("_before_")[0] + backup.suffix)
        assert backup.read_bytes() == original.read_bytes()
    assert sha(models / "model.pt") == sha(prompt_run[0] / "model.pt")
    assert NEW in json.loads((models / "tasks.json").read_text())["tasks"]


def test_no_differs_warning_for_the_same_values_written_otherwise(caplog):
    """A datalist's list (the model's tuple), 3 (3.0): the same definition, no warning; another value warns."""
    from uniseg_monai.apps.add_task import _warn_about

    registry = TaskRegistry()
    name = registry.names[0]
    spec = json.loads(json.dumps(registry[name].to_json()))
    data = {"tasks": {name: spec}, "validation": [{"task": "new"}]}
    _warn_about(data, "dl.json", registry, "new", "prompt", [], False)
    assert "differs" not in caplog.text
    spec["spacing"] = [9, 9, 9]
    _warn_about(data, "dl.json", registry, "new", "prompt", [], False)
    assert "differs from the model's in ['spacing']" in caplog.text
