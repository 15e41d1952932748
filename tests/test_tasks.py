"""The task registry: built-in facts, user extension through the datalist, CLI."""

from __future__ import annotations

import json
import re
import sys

import pytest

from uniseg_monai.cli import main
from uniseg_monai.engine.wiring import registry_for_run, requested_task
from uniseg_monai.tasks import (
    TASK_NAME_RULE,
    TaskError,
    TaskRegistry,
    check_task_name,
    load_model_tasks,
    resolve_task,
    save_model_tasks,
)

PAPER_TASKS = [
    "liver",
    "kidney",
    "hepatic_vessel",
    "pancreas",
    "colon",
    "lung",
    "spleen",
    "verse20",
    "prostate",
    "brats21",
    "autopet",
]
PAPER_CLASSES = {0: 3, 1: 3, 2: 3, 3: 3, 4: 2, 5: 2, 6: 2, 7: 2, 8: 2, 9: 4, 10: 2}


def test_builtin_tasks_follow_the_paper():
    reg = TaskRegistry()
    assert [reg.by_id(i).name for i in range(11)] == PAPER_TASKS
    assert {i: reg.by_id(i).num_classes for i in range(11)} == PAPER_CLASSES
    assert reg["brats21"].in_channels == 4 and reg["autopet"].in_channels == 2
    assert reg["liver"].spacing == (1.5, 1.5, 3.0) and reg["verse20"].spacing == (2.0, 2.0, 4.0)
    assert reg["autopet"].spacing == (4.0, 4.0, 8.0) and reg["brats21"].spacing == (1.0, 1.0, 1.0)
    assert [n.kind for n in reg["autopet"].normalization] == ["ct", "zscore"]
    assert reg["liver"].normalization[0].window == (-325.0, 325.0)
    assert reg["brats21"].label_map == {2: 1, 1: 2, 4: 3}
    assert reg["btcv"].num_classes == 14 and reg["btcv"].labels[1] == "spleen" and reg["vs"].num_classes == 2
    assert reg.subset(PAPER_TASKS).num_tasks == 11 and reg.subset(PAPER_TASKS).num_classes == 4


def test_users_add_and_override_tasks_without_code():
    reg = TaskRegistry().extended(
        {
            "brain_tissue": {
                "modalities": ["MR"],
                "labels": ["background", "grey matter", "white matter"],
                "spacing": [2.0, 2.0, 2.0],
                "normalization": ["zscore_nonzero"],
            },
            "liver": {"normalization": [{"type": "ct", "window": [-100, 200]}]},
        }
    )
    assert reg["brain_tissue"].id == 13 and reg["brain_tissue"].num_classes == 3
    assert reg["liver"].normalization[0].window == (-100.0, 200.0)
    assert reg["liver"].labels == TaskRegistry()["liver"].labels  # untouched fields kept
    assert reg.subset(["liver", "brain_tissue"]).num_tasks == 14


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"modalities": ["a", "b", "c"], "labels": ["bg", "x"], "spacing": [1, 1, 1]}, "stems for 1, 2 or 4"),
        ({"modalities": ["CT"], "labels": ["bg"], "spacing": [1, 1, 1]}, "at least one class"),
        ({"modalities": ["CT"], "labels": ["bg", "x"], "spacing": [1, 1]}, "spacing"),
        ({"modalities": ["CT"], "labels": ["bg", "x"], "spacing": [1, 1, 1], "normalization": ["minmax"]}, "minmax"),
        ({"modalities": ["CT"], "labels": ["bg", "x"], "spacing": [1, 1, 1], "label_map": {"3": 2}}, "label_map"),
        ({"modalities": ["CT"], "labels": ["bg", "x"]}, "missing"),
        ({"modalities": ["CT"], "labels": ["bg", "x"], "spacing": [1, 1, 1], "colour": 1}, "unknown keys"),
    ],
)
def test_invalid_task_definitions_are_clear_errors(spec, message):
    with pytest.raises(TaskError, match=message):
        TaskRegistry().extended({"mine": spec})


def test_duplicate_ids_and_unknown_tasks():
    reg = TaskRegistry().extended({"mine": {"id": 0, "modalities": ["CT"], "labels": ["bg", "x"], "spacing": [1] * 3}})
    with pytest.raises(TaskError, match="share id 0"):
        reg.subset(["liver", "mine"])
    assert reg.subset(["mine", "spleen"]).num_tasks == 7
    with pytest.raises(TaskError, match="unknown task 'livr'"):
        reg["livr"]


ESCAPING = ["../x", "x/../../../ESCAPED", "/etc/x", "..", ".hidden", "a b", "a\\b", "", "x" * 65, "all", "ALL"]
ESCAPING += ["all_merged", 3]
MINE = {"modalities": ["CT"], "labels": ["bg", "x"], "spacing": [1, 1, 1]}


@pytest.mark.parametrize("name", ESCAPING)
def test_task_names_are_identifiers_wherever_they_enter(name, tmp_path):
    rule = re.escape(f"task name {name!r}: {TASK_NAME_RULE}")
    with pytest.raises(TaskError, match=rf"^--task: {rule}$"):
        check_task_name(name, "--task")
    with pytest.raises(TaskError, match=rule):  # a datalist's "tasks"
        TaskRegistry().extended({name: MINE})
    with pytest.raises(TaskError, match=rule):  # a lookup (an item's task, a bundle id): why, not only "unknown"
        TaskRegistry()[name]
    if not isinstance(name, str):
        return
    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": {name: {**MINE, "id": 0}}}))
    with pytest.raises(TaskError, match=f"^{re.escape(str(tmp_path / 'tasks.json'))}: {rule}$"):
        load_model_tasks(tmp_path)
    if name:
        with pytest.raises(TaskError, match=f"^MONAI Label request: task: {rule}$"):
            requested_task(name)
        with pytest.raises(TaskError, match=f"^bundle id task \\(--task\\): {rule}$"):
            registry_for_run(tmp_path / "missing.json", tmp_path, task=name)


def test_task_names_may_use_letters_digits_underscore_dot_and_dash():
    for name in ("liver", "Task003_Liver", "ct-1.5mm", "0", "x" * 64, "allx", "merged"):
        assert check_task_name(name) == name and TaskRegistry().extended({name: MINE})[name].name == name


def uniseg_tasks(*options: str, capsys) -> str:
    """What ``uniseg tasks OPTIONS`` (the CLI's ``main``, in this process) prints; asserts it exits with 0."""
    with pytest.raises(SystemExit) as done:
        main(["tasks", *options])
        sys.exit(0)
    assert done.value.code in (0, None)
    return capsys.readouterr().out


def test_cli_prints_registry(capsys):
    assert all(name in uniseg_tasks(capsys=capsys) for name in PAPER_TASKS + ["btcv", "vs"])
    as_json = uniseg_tasks("--json", capsys=capsys)
    assert json.loads(as_json) == json.loads(json.dumps(TaskRegistry().to_json()))


def test_an_items_task_and_the_tasks_of_a_run_without_datalist(tmp_path):
    registry = TaskRegistry().subset(["liver", "spleen"])
    assert registry.names == ["liver", "spleen"]
    assert resolve_task({"task": "spleen"}, registry, default="liver").name == "spleen"
    assert resolve_task({"task": ["liver", "spleen"]}, registry, "spleen").name == "spleen"  # an unchosen drop-down
    assert resolve_task({}, registry.subset(["liver"])).name == "liver"  # the only task
    with pytest.raises(TaskError, match=r"a\.nii\.gz: no task given; choose one of \['liver', 'spleen'\]"):
        resolve_task({"image": "a.nii.gz"}, registry)
    assert requested_task(["liver", "spleen"]) == "" and requested_task("spleen") == "spleen"
    missing = tmp_path / "datalist.json"
    assert registry_for_run(missing, tmp_path).to_json() == TaskRegistry().to_json()  # built-in tasks
    save_model_tasks(registry, tmp_path)
    assert registry_for_run(missing, tmp_path).to_json() == registry.to_json()  # the model's tasks.json


def test_a_run_with_other_task_definitions_than_its_model_shows_the_difference(tmp_path):
    registry = TaskRegistry().subset(["liver", "spleen"])
    save_model_tasks(registry, tmp_path)
    save_model_tasks(registry, tmp_path)  # the same tasks: a resumed run
    relabelled = registry.extended({"liver": {"label_map": {"2": 1}}})
    with pytest.raises(TaskError) as refused:
        save_model_tasks(relabelled, tmp_path)
    assert "(task 'liver' label_map: {} there, {'2': 1} in the datalist)" in str(refused.value)
    assert "use another --ckpt_dir" in str(refused.value)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([1, 2], 'must be an object with a "tasks" key, got a list [1, 2]; a model\'s task table is {"tasks": {'),
        ({"liver": {**MINE, "id": 0}}, "got an object with keys ['liver'] (it looks like the table itself: wrap it in"),
        ({"tasks": {"liver": 1}}, "task 'liver' must be a task definition, an object such as {\"id\": 0, "),
        ({"tasks": {"liver": {**MINE, "id": True}}}, "task 'liver': id must be an integer from 0 to 1023, got True"),
    ],
)
def test_a_tasks_json_in_the_wrong_form_is_one_line_naming_the_file_and_the_form(tmp_path, document, message):
    """A list instead of a table, a table without its "tasks" wrapper, a number instead of a task definition, a
    boolean id (an int in Python): one line naming the file, what it holds and the form it needs."""
    (tmp_path / "tasks.json").write_text(json.dumps(document))
    with pytest.raises(TaskError) as err:
        load_model_tasks(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'tasks.json'}: ") and message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tasks", "--check"], "uniseg: error: --check compares a bundle's metadata.json with its task table: give "
                               "--metadata BUNDLE too"),
        (["tasks", "extra"], "uniseg: error: `uniseg tasks`: Could not consume arg: extra (see `uniseg tasks --help`)"),
    ],
)  # fmt: skip
def test_uniseg_tasks_refuses_check_without_metadata_and_a_positional_in_one_line(capsys, argv, message):
    """--check alone was silently the plain table; an extra positional filled --json ("--json takes true or
    false")."""
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [message]
