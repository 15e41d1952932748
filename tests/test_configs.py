"""The bundles as data: the paper's pipeline values pinned to the facts file, no logic in the configs, metadata
generated from the task tables, task wiring in one library module."""

from __future__ import annotations

import json
import math
import re
import shutil
import stat
import sys

import pytest
import torch
from conftest import BUNDLES, shared_path
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.handlers import CheckpointSaver, StatsHandler
from monai.transforms import Rand3DElasticd

from uniseg_monai.apps.bundles import FINETUNE_BUNDLES
from uniseg_monai.apps.finetune_bundles import TABLE, TEMPLATE, differences, write_bundles
from uniseg_monai.apps.metadata import bundle_network_data_format, sync_metadata
from uniseg_monai.cli import main
from uniseg_monai.core.errors import UniSegError, UsageError, flag
from uniseg_monai.engine.checkpoints import ResumeCheckpointLoader
from uniseg_monai.engine.handlers import GradientClipping
from uniseg_monai.engine.wiring import bundle_items, default_task, rank_handlers, requested_task, start_run, task_names
from uniseg_monai.model_io.model_files import ModelLoader
from uniseg_monai.tasks import BUILTIN_TASKS, PAPER_UPSTREAM_TASKS, TaskRegistry

NAMES = ["uniseg_pretrain", "uniseg_finetune_btcv", "uniseg_finetune_vs"]
MODEL_ZOO_IDIOMS = (
    "torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",  # the device choice of every model-zoo bundle
)


def config(name: str, file: str = "train") -> dict:
    return json.loads((BUNDLES / name / "configs" / f"{file}.json").read_text())


def expressions(node) -> list[str]:
    """Every ``$`` expression of a config but the imports."""
    if isinstance(node, dict):
        return [e for k, v in node.items() if k != "imports" for e in expressions(v)]
    if isinstance(node, list):
        return [e for v in node for e in expressions(v)]
    return [node] if isinstance(node, str) and node.startswith("$") else []


def facts_augmentation() -> str:
    text = shared_path("docs/uniseg_facts.md").read_text()
    return re.search(r"Augmentation \(nnU-Net v2-style \"moreDA\"\):(.*?)\n- ", text, re.S).group(1)


def prob(text: str, name: str) -> float:
    return float(re.search(rf"{name}.*?\(p ([\d.]+)\)", text).group(1))


@pytest.mark.parametrize("name", NAMES)
def test_augmentation_defaults_are_the_papers(name):
    facts = " ".join(facts_augmentation().split())
    steps = config(name)["augmentation_transforms"]
    by_type = {}
    for step in steps:
        by_type.setdefault(step["_target_"], []).append(step)
    rotation, zoom = by_type["RandRotated"][0], by_type["RandZoomd"][0]
    degrees = float(re.search(r"rotation ±(\d+)°", facts).group(1))
    assert [rotation[f"range_{a}"] for a in "xyz"] == [pytest.approx(math.radians(degrees))] * 3
    assert rotation["prob"] == prob(facts, "rotation")
    low, high = (float(v) for v in re.search(r"scaling ([\d.]+)\W([\d.]+)", facts).groups())
    assert (zoom["min_zoom"], zoom["max_zoom"], zoom["prob"]) == (low, high, prob(facts, "scaling"))
    assert by_type["RandGaussianNoised"][0]["prob"] == prob(facts, "Gaussian noise")
    assert by_type["RandGaussianSmoothd"][0]["prob"] == prob(facts, "Gaussian blur")
    brightness = by_type["RandScaleIntensityd"][0]
    low, high = (float(v) for v in re.search(r"brightness \W\(([\d.]+)\W([\d.]+)\)", facts).groups())
    assert (1 - brightness["factors"], 1 + brightness["factors"]) == (low, high)
    assert brightness["prob"] == prob(facts, "brightness")
    assert by_type["RandScaleIntensityFixedMeand"][0]["prob"] == prob(facts, "contrast")
    assert by_type["RandSimulateLowResolutiond"][0]["prob"] == prob(facts, "simulated low resolution")
    inverted, normal = by_type["RandAdjustContrastd"]
    assert inverted["invert_image"] and not normal.get("invert_image", False)
    gamma = re.search(r"gamma \(inverted p ([\d.]+), normal p ([\d.]+)\)", facts).groups()
    assert (inverted["prob"], normal["prob"]) == tuple(float(g) for g in gamma)
    assert "mirroring on all 3 axes" in facts and sorted(f["spatial_axis"] for f in by_type["RandFlipd"]) == [0, 1, 2]
    assert "no elastic" in facts and Rand3DElasticd.__name__ not in json.dumps(steps)
    oversampling = re.search(r"foreground oversampling ([\d.]+)", shared_path("docs/uniseg_facts.md").read_text())
    assert config(name)["foreground_fraction"] == float(oversampling.group(1))


@pytest.mark.parametrize("name", NAMES)
def test_configs_hold_wiring_and_values_not_logic(name):
    for file in ("train", "evaluate", "inference"):
        for expression in expressions(config(name, file)):
            body = expression
            for idiom in MODEL_ZOO_IDIOMS:
                body = body.replace(idiom, "")
            assert not re.search(r"\b(if|else|or|and|for|lambda)\b", body), f"{name}/{file}.json: {expression}"
    # spleen_ct_segmentation's train.json has 17; + the one-line errors, the validation check, the run folder's release
    assert len(expressions(config(name))) <= 20


@pytest.mark.parametrize("name", ["uniseg_pretrain", "uniseg_finetune_btcv"])
def test_the_demo_overlay_applies_to_every_workflow(name):
    """demo.json overlays train.json (+ evaluate.json) and inference.json alike: every id it sets exists there."""
    for files in (["train", "demo"], ["train", "demo", "evaluate"], ["inference", "demo"]):
        parser = ConfigParser()
        parser.read_config([str(BUNDLES / name / "configs" / f"{f}.json") for f in files])
        assert parser["patch_size"] == [32, 32, 16]
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / name / "configs" / f"{f}.json") for f in ("train", "demo")])
    assert parser["augmentation_transforms"] == []  # the demo trains with the crop only


def test_validation_reuses_the_deterministic_training_transforms_by_macro():
    for name in NAMES:
        assert config(name)["validate"]["preprocessing"]["transforms"] == "%train#deterministic_transforms"


@pytest.mark.parametrize("name", NAMES)
def test_committed_metadata_is_the_generated_one(name, capsys):
    assert sync_metadata(BUNDLES / name, check=True)[1] is False
    with pytest.raises(SystemExit) as done:
        main(["tasks", "--metadata", str(BUNDLES / name), "--check"])
        sys.exit(0)
    printed = capsys.readouterr()
    assert done.value.code in (0, None) and "up to date" in printed.out, printed.err


def test_metadata_follows_the_task_table(tmp_path):
    bundle = shutil.copytree(BUNDLES / "uniseg_finetune_vs", tmp_path / "vs")
    table = json.loads((bundle / "models" / "tasks.json").read_text())
    table["tasks"]["vs"].update(labels=["background", "intrameatal", "extrameatal"], short_labels=["bg", "IM", "EM"])
    (bundle / "models" / "tasks.json").write_text(json.dumps(table))
    path, differs = sync_metadata(bundle)
    assert differs and path == bundle / "configs" / "metadata.json"
    pred = json.loads(path.read_text())["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == 3 and pred["channel_def"]["2"] == "extrameatal"
    assert sync_metadata(bundle, check=True)[1] is False
    assert json.loads(path.read_text())["version"] == json.loads((BUNDLES / "uniseg_finetune_vs" / "configs" /
                                                                  "metadata.json").read_text())["version"]  # fmt: skip


def finetune_copy(tmp_path):
    """A bundles folder with the fine-tuning template and copies of the fine-tuning bundles (no weights)."""
    root = tmp_path / "bundles"
    shutil.copytree(BUNDLES / "templates", root / "templates")
    for name in FINETUNE_BUNDLES.values():
        shutil.copytree(BUNDLES / name, root / name, ignore=shutil.ignore_patterns("*.pt", "eval", "__pycache__"))
    return root


def finetune_bundles(root, *options, capsys) -> tuple[int, list[str], str]:
    """``uniseg finetune-bundles --root ROOT OPTIONS``: exit code, printed lines and stderr."""
    with pytest.raises(SystemExit) as done:
        main(["finetune-bundles", "--root", str(root), *options])
        sys.exit(0)
    printed = capsys.readouterr()
    return done.value.code or 0, printed.out.splitlines(), printed.err


def test_committed_finetune_bundles_are_the_generated_ones(capsys):
    assert differences(BUNDLES) == []
    code, lines, _ = finetune_bundles(BUNDLES, "--check", capsys=capsys)
    assert code == 0 and lines == [f"{BUNDLES}: fine-tuning bundles up to date"]


def test_a_template_change_reaches_every_finetune_bundle(tmp_path, capsys):
    root = finetune_copy(tmp_path)
    template = root / TEMPLATE / "configs" / "train.json"
    template.write_text(template.read_text().replace("{\n", '{\n    "probe": "{{task}} of {{name}}",\n', 1))
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    trains = [root / name / "configs" / "train.json" for name in FINETUNE_BUNDLES.values()]
    code, lines, _ = finetune_bundles(root, "--check", capsys=capsys)
    assert code == 1 and lines == [f"{p}: differs from the template" for p in trains]
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before  # --check writes nothing
    code, lines, _ = finetune_bundles(root, capsys=capsys)
    assert code == 0 and lines == [f"{p}: updated" for p in trains]
    for (task, name), train in zip(FINETUNE_BUNDLES.items(), trains):
        assert json.loads(train.read_text())["probe"] == f"{task} of {name}"
    changed = {p for p in root.rglob("*") if p.is_file() and before.get(p) != p.read_bytes()}
    assert changed == set(trains)
    assert finetune_bundles(root, "--check", capsys=capsys)[0] == 0


def test_finetune_bundles_follow_the_task_registry_and_their_table(tmp_path, monkeypatch):
    root = finetune_copy(tmp_path)
    vs = root / FINETUNE_BUNDLES["vs"]
    parts = {"labels": ["background", "intrameatal", "extrameatal"], "short_labels": ["bg", "IM", "EM"]}
    monkeypatch.setitem(BUILTIN_TASKS, "vs", {**BUILTIN_TASKS["vs"], **parts})
    table = json.loads((root / TABLE).read_text())
    table[vs.name]["text"]["metadata_name"] = "UniSeg fine-tuned on two VS parts"
    (root / TABLE).write_text(json.dumps(table))
    written = write_bundles(root)
    assert written and all(vs in p.parents for p in written)  # btcv's task and texts did not change
    meta = json.loads((vs / "configs" / "metadata.json").read_text())
    assert meta["name"] == "UniSeg fine-tuned on two VS parts" and meta["pred_classes"].startswith("3 logits")
    assert json.loads((vs / "models" / "tasks.json").read_text())["tasks"]["vs"]["short_labels"] == ["bg", "IM", "EM"]
    assert "| metric | IM | EM | Mean |" in (vs / "docs" / "README.md").read_text()
    assert sync_metadata(vs, check=True)[1] is False  # the template's network_data_format is metadata.py's
    assert differences(root) == []


def spoil_finetune_source(root, what: str) -> None:
    """A template placeholder no value fills, a table entry with an unknown task, or one leaving out no file."""
    table = json.loads((root / TABLE).read_text())
    if what == "placeholder":
        (root / TEMPLATE / "docs" / "notes.md").write_text("{{no_such_key}}\n")
    elif what == "task":
        table[FINETUNE_BUNDLES["vs"]]["task"] = "no_such_task"
    else:
        table[FINETUNE_BUNDLES["vs"]]["leave_out"] = ["configs/no_such.json"]
    (root / TABLE).write_text(json.dumps(table))


@pytest.mark.parametrize(
    "what, expected",
    [
        ("placeholder", "notes.md: no value for {{no_such_key}}"),
        ("task", "has task 'no_such_task'; use a built-in one"),
        ("leave_out", "leave_out ['configs/no_such.json'] not in"),
    ],
)
def test_a_broken_finetune_source_is_one_line_and_nothing_written(tmp_path, capsys, what, expected):
    root = finetune_copy(tmp_path)
    spoil_finetune_source(root, what)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    code, _, err = finetune_bundles(root, capsys=capsys)
    assert code == 2 and expected in err and len(err.splitlines()) == 1, err
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_a_file_no_template_makes_is_listed(tmp_path, capsys):
    root = finetune_copy(tmp_path)
    extra = root / FINETUNE_BUNDLES["vs"] / "configs" / "demo.json"  # btcv's, left out of vs by the table
    shutil.copy(root / FINETUNE_BUNDLES["btcv"] / "configs" / "demo.json", extra)
    code, lines, _ = finetune_bundles(root, "--check", capsys=capsys)
    assert code == 1 and len(lines) == 1 and lines[0].startswith(f"{extra}: not made by the template")


def test_pretrain_metadata_lists_the_papers_upstream_tasks():
    task_id = bundle_network_data_format(BUNDLES / "uniseg_pretrain")["inputs"]["task_id"]
    assert task_id["value_range"] == [0, 10] and list(task_id["channel_def"].values()) == list(PAPER_UPSTREAM_TASKS)
    assert all(BUILTIN_TASKS[n]["paper"] == "upstream" for n in PAPER_UPSTREAM_TASKS)
    assert [n for n, s in BUILTIN_TASKS.items() if s["paper"] == "downstream"] == ["btcv", "vs"]


def test_monai_label_cases_live_in_the_wiring(phantoms):
    registry = TaskRegistry().subset(["liver", "spleen"])
    assert task_names(registry) == ["liver", "spleen"] and task_names(registry, "spleen") == ["spleen"]
    assert requested_task(["liver", "spleen"]) == "" and requested_task("spleen") == "spleen"  # drop-down / chosen
    assert default_task("liver", "spleen") == "spleen" and default_task("liver") == "liver"
    assert bundle_items("missing.json", "training", registry, request_task="spleen") == []  # MONAI Label's items


def test_multi_gpu_ranks_select_handlers_by_type_not_position(tmp_path):
    saver = CheckpointSaver(str(tmp_path), {"x": torch.nn.Linear(1, 1)}, save_final=True)
    handlers = [StatsHandler(), GradientClipping(), saver, ModelLoader(tmp_path / "m.pt", None)]
    for order in (handlers, handlers[::-1]):
        assert rank_handlers(order, 0) == order
        assert [type(h).__name__ for h in rank_handlers(order, 1)] == [
            type(h).__name__ for h in order if isinstance(h, (GradientClipping, ModelLoader))
        ]


def test_boolean_ids_typed_on_the_command_line_mean_what_they_say(tmp_path):
    assert [flag(v, "x") for v in ("false", "False", "no", "0", False)] == [False] * 5
    assert [flag(v, "x") for v in ("true", "YES", "1", True)] == [True] * 4
    with pytest.raises(UsageError, match="--resume takes true or false, got 'maybe'"):
        flag("maybe", "resume")
    (tmp_path / "checkpoint_epoch=1.pt").write_bytes(b"earlier run")
    with pytest.raises(FileExistsError, match="--resume true"):  # `--resume false` must not resume
        start_run(tmp_path, "false", TaskRegistry().subset(["liver"]))
    assert not ResumeCheckpointLoader(tmp_path, "false", {"model": torch.nn.Linear(1, 1)}).resume


@pytest.mark.parametrize(
    ("file", "content", "expected"),
    [
        ("configs/metadata.json", "{not json", "not valid JSON"),
        ("configs/metadata.json", "[1, 2]", "must be a JSON object"),
        ("models/tasks.json", '{"tasks": []}', '"tasks" must map task names'),
        ("models/tasks.json", '{"tasks": {"x": {"id": "a"}}}', "tasks.json: task 'x': missing"),
        ("configs/inference.json", '{"network_def": {"_target_": "UNet"}, "strides": "%train#strides"}', "strides"),
        ("configs/inference.json", '{"strides": [[2, 2, 2]]}', "network_def"),
    ],
)
def test_metadata_errors_name_the_file_and_change_nothing(tmp_path, file, content, expected):
    bundle = shutil.copytree(BUNDLES / "uniseg_finetune_vs", tmp_path / "vs")
    (bundle / file).write_text(content)
    before = (bundle / "configs" / "metadata.json").read_bytes()
    with pytest.raises(UniSegError, match=re.escape(expected)) as err:
        sync_metadata(bundle)
    assert str(bundle) in str(err.value)
    assert (bundle / "configs" / "metadata.json").read_bytes() == before


def test_a_read_only_metadata_file_is_refused_and_kept(tmp_path):
    bundle = shutil.copytree(BUNDLES / "uniseg_finetune_vs", tmp_path / "vs")
    table = json.loads((bundle / "models" / "tasks.json").read_text())
    table["tasks"]["vs"]["labels"][1] = "tumour"
    (bundle / "models" / "tasks.json").write_text(json.dumps(table))
    path = bundle / "configs" / "metadata.json"
    path.chmod(0o444)
    before = path.read_bytes()
    with pytest.raises(UsageError, match="read-only"):
        sync_metadata(bundle)
    assert path.read_bytes() == before and stat.S_IMODE(path.stat().st_mode) == 0o444
    path.chmod(0o640)
    assert sync_metadata(bundle)[1] and stat.S_IMODE(path.stat().st_mode) == 0o640  # updated, its mode kept


@pytest.mark.parametrize("name", NAMES)
def test_compile_and_amp_dtype_are_ids_of_every_workflow(name):
    for file in ("train", "inference"):
        ids = config(name, file)
        assert ids["compile"] == ids["amp"] == {"_target_": "torch.cuda.is_available"}  # on for CUDA, off for CPU
        assert ids["amp_dtype"] == "bfloat16"
    for file in ("train", "evaluate", "inference", "multi_gpu_train", "multi_gpu_evaluate"):
        text = json.dumps(config(name, file))
        assert "network_def" not in text or "uniseg_monai.networks.compiled(" in text, file


def test_compile_and_amp_dtype_reach_the_network_and_the_engines(phantoms):
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / "uniseg_pretrain" / "configs" / f"{f}.json") for f in ("train", "demo")])
    parser.update({"dataset_dir": str(phantoms.parent), "compile": "true", "amp_dtype": "float16"})
    network = parser.get_parsed_content("network")
    assert network._compiled_call_impl is not None and not any(k.startswith("_orig_mod") for k in network.state_dict())
    for engine in ("train#trainer", "validate#evaluator"):
        assert parser.get_parsed_content(f"{engine}#amp_kwargs") == {"dtype": torch.float16}


@pytest.mark.parametrize("name", NAMES)
def test_the_trainer_hands_the_network_plain_tensors_and_the_evaluator_meta_tensors(name):
    """MetaTensor inputs make every operation of a training step a MetaTensor one; the evaluator's post-processing
    needs the image's meta data, which it reads from the prepared batch."""
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / name / "configs" / "train.json")])
    prepare = parser.get_parsed_content("train#trainer#prepare_batch")
    meta = {"affine": torch.eye(4), "filename_or_obj": "ct.nii.gz"}
    batch = {"image": MetaTensor(torch.rand(2, 1, 4, 4, 4), meta=meta), "label": MetaTensor(torch.ones(2, 1, 4, 4, 4)),
             "task_id": torch.tensor([1, 1])}  # fmt: skip
    image, label, args, kwargs = prepare(batch, torch.device("cpu"))
    assert type(image) is torch.Tensor and type(label) is torch.Tensor
    assert torch.equal(image, batch["image"].as_tensor())
    if name == "uniseg_pretrain":  # the task id goes to UniSeg, not to the backbones
        assert torch.equal(kwargs["task_id"], batch["task_id"]) and args == ()
    else:
        assert kwargs == {} and args == ()
    evaluator = parser.get_parsed_content("validate#evaluator#prepare_batch", default=None)
    if evaluator is not None:
        assert isinstance(evaluator(batch, torch.device("cpu"))[0], MetaTensor)


def test_the_module_paths_before_the_layers_still_resolve_with_a_warning_naming_the_new_one():
    """A user's overlay or code written for the flat layout (0.4): old ``_target_``, ``$`` expression and import
    resolve to the same objects (a split module's names in both new homes); a name that never existed still fails."""
    import uniseg_monai
    from uniseg_monai.data.transforms import InvertArgmaxd
    from uniseg_monai.engine.checkpoints import ModelCheckpointSaver

    with pytest.warns(DeprecationWarning, match=r"uniseg_monai\.transforms\.InvertArgmaxd moved to uniseg_monai\.data\."
                      r"transforms\.InvertArgmaxd"):  # fmt: skip
        from uniseg_monai.transforms import InvertArgmaxd as old_transform
    assert old_transform is InvertArgmaxd
    with pytest.warns(DeprecationWarning, match=r"moved to uniseg_monai\.engine\.checkpoints\.ModelCheckpointSaver"):
        from uniseg_monai.model_files import ModelCheckpointSaver as old_saver
    assert old_saver is ModelCheckpointSaver
    overlay = {
        "imports": ["$import torch", "$import uniseg_monai"],
        "loader": {"_target_": "uniseg_monai.model_files.ModelLoader", "load_path": "m.pt", "network": "$None"},
        "resume": "$uniseg_monai.errors.flag('yes', 'resume')",
    }
    parser = ConfigParser(overlay)
    with pytest.warns(DeprecationWarning, match=r"uniseg_monai\.model_io\.model_files\.ModelLoader"):
        assert type(parser.get_parsed_content("loader")) is ModelLoader
    with pytest.warns(DeprecationWarning, match=r"uniseg_monai\.core\.errors\.flag"):
        assert parser.get_parsed_content("resume") is True
    with pytest.raises(ModuleNotFoundError, match=r"uniseg_monai\.no_such_module"):
        __import__("uniseg_monai.no_such_module")
    with pytest.raises(AttributeError, match="no attribute 'no_such_module'"):
        _ = uniseg_monai.no_such_module
    with pytest.raises(ImportError, match="NoSuchThing"):
        from uniseg_monai.transforms import NoSuchThing  # noqa: F401
