"""Phantoms, check-data and prepare."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.filebasedimages import ImageFileError

from uniseg_monai.apps.finetune_bundles import read_table
from uniseg_monai.apps.metadata import sync_metadata
from uniseg_monai.apps.report import write_report
from uniseg_monai.core.errors import InputError, UniSegError, UsageError
from uniseg_monai.data import DatalistError, check, load_items
from uniseg_monai.data.check import check_datalist
from uniseg_monai.data.phantoms import generate_downstream_phantoms, generate_phantoms
from uniseg_monai.data.prepare import prepare
from uniseg_monai.engine.wiring import registry_for_datalist
from uniseg_monai.tasks import TaskError, load_model_tasks


@pytest.mark.integration
def test_phantoms_are_deterministic_and_clean(phantoms, tmp_path):
    again = generate_phantoms(tmp_path / "again")
    assert again.read_text() == phantoms.read_text()
    a = nib.load(phantoms.parent / "brain" / "brain_003_flair.nii.gz")
    b = nib.load(again.parent / "brain" / "brain_003_flair.nii.gz")
    assert np.array_equal(a.get_fdata(), b.get_fdata()) and np.allclose(a.affine, b.affine)
    run = subprocess.run([sys.executable, "-m", "uniseg_monai", "check-data", str(phantoms)], capture_output=True)
    assert run.returncode == 0, run.stdout


def test_phantoms_need_the_task_to_be_solved(phantoms):
    registry = registry_for_datalist(phantoms)
    assert sorted(registry) == ["ph_brain", "ph_liver", "ph_organs", "ph_petct"]
    assert {registry[n].in_channels for n in registry} == {1, 2, 4}
    items = load_items(phantoms, "training", registry)
    organs = {i["image"]: i["label"] for i in items if i["task"] == "ph_organs"}
    livers = {i["image"]: i["label"] for i in items if i["task"] == "ph_liver"}
    assert organs.keys() == livers.keys()  # the same CT volumes carry both tasks
    for image in organs:
        organ = nib.load(organs[image]).get_fdata()
        liver = nib.load(livers[image]).get_fdata()
        assert (liver == 2).any() and (organ[liver == 2] == 1).all()  # label 2 "liver tumour" is "liver" in ph_organs
        assert (organ == 2).any() and (liver[organ == 2] == 0).all()  # label 2 "spleen" is background in ph_liver
    orientations = {nib.aff2axcodes(nib.load(i["image"]).affine) for i in items if i["task"] == "ph_organs"}
    assert len(orientations) == 2  # RAS and LPS cases


def write_like(src: Path, dst: Path, data=None, affine=None) -> str:
    img = nib.load(src)
    out = img.get_fdata() if data is None else data
    nib.save(nib.Nifti1Image(out, img.affine if affine is None else affine), dst)
    return str(dst)


@pytest.mark.integration
def test_check_data_reports_every_problem_with_its_file(phantoms, tmp_path):
    root = phantoms.parent
    good = json.loads(phantoms.read_text())
    ct, organs = root / "abdomen/abdomen_000_ct.nii.gz", root / "abdomen/abdomen_000_organs.nii.gz"
    shape = nib.load(ct).shape
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"not a nifti at all")
    nan = np.zeros(shape)
    nan[0, 0, 0] = np.nan
    nan[1, 1, 1] = 5
    bad_affine = nib.load(ct).affine.copy()
    bad_affine[0, 3] += 30
    flat = np.zeros(shape)
    too_many = nib.load(organs).get_fdata() * 2
    files = {
        "shape": write_like(organs, tmp_path / "shape.nii.gz", data=np.zeros((10, 10, 10))),
        "affine": write_like(organs, tmp_path / "affine.nii.gz", affine=bad_affine),
        "values": write_like(organs, tmp_path / "values.nii.gz", data=too_many),
        "nan": write_like(ct, tmp_path / "nan.nii.gz", data=nan),
        "flat": write_like(ct, tmp_path / "flat.nii.gz", data=flat),
        "2d": write_like(ct, tmp_path / "flat2d.nii.gz", data=np.ones((20, 20)) * np.arange(20)),
        "complex": write_like(ct, tmp_path / "complex.nii.gz", data=nib.load(ct).get_fdata().astype(np.complex64)),
    }
    cases = [
        ({"image": str(root / "missing.nii.gz"), "label": str(organs), "task": "ph_organs"}, "missing.nii.gz"),
        ({"image": str(corrupt), "label": str(organs), "task": "ph_organs"}, "corrupt.nii.gz"),
        ({"image": str(ct), "label": files["shape"], "task": "ph_organs"}, "shape.nii.gz"),
        ({"image": str(ct), "label": files["affine"], "task": "ph_organs"}, "affine.nii.gz"),
        ({"image": str(ct), "label": files["values"], "task": "ph_organs"}, "values.nii.gz"),
        ({"image": files["nan"], "label": str(organs), "task": "ph_organs"}, "nan.nii.gz"),
        ({"image": files["flat"], "label": str(organs), "task": "ph_organs"}, "flat.nii.gz"),
        ({"image": files["2d"], "task": "ph_organs"}, "flat2d.nii.gz"),
        ({"image": files["complex"], "label": str(organs), "task": "ph_organs"}, "complex.nii.gz"),
        ({"image": str(ct), "label": str(organs), "task": "ph_brain"}, "4 (T1+T1ce+T2+FLAIR)"),
        ({"image": str(ct), "label": str(organs), "task": "no_such_task"}, "unknown task 'no_such_task'"),
    ]
    expected = {
        "missing.nii.gz": "file not found",
        "corrupt.nii.gz": "unreadable or corrupt",
        "shape.nii.gz": "differ from image",
        "affine.nii.gz": "differ from image",
        "values.nii.gz": "outside task 'ph_organs'",
        "nan.nii.gz": "NaN or Inf",
        "flat.nii.gz": "empty or constant",
        "flat2d.nii.gz": "not a 3D volume",
        "complex.nii.gz": "complex-valued voxels: not a real-valued image",
        "4 (T1+T1ce+T2+FLAIR)": "channel(s)",
        "unknown task 'no_such_task'": "unknown task",
    }
    for item, marker in cases:
        datalist = tmp_path / "dl.json"
        datalist.write_text(json.dumps({"tasks": good["tasks"], "training": [item]}))
        problems = [str(p) for p in check_datalist(datalist, progress=False)]
        assert any(marker in p and expected[marker] in p for p in problems), (marker, problems)
        assert all("fix:" in p for p in problems)

    leak = {"tasks": good["tasks"], "training": good["training"][:1], "validation": good["training"][:1]}
    duplicate_ids = {"tasks": {**good["tasks"], "ph_liver": {**good["tasks"]["ph_liver"], "id": 0}}}
    duplicate_ids["training"] = good["training"][:2]
    leaked = f"{Path(good['training'][0]['image']).name}: is in both training[0] and validation[0]"
    for content, marker in ((leak, leaked), (duplicate_ids, "share id 0")):
        datalist = tmp_path / "dl.json"
        datalist.write_text(json.dumps(content))
        assert any(marker in str(p) for p in check_datalist(datalist, progress=False))
    run = subprocess.run([sys.executable, "-m", "uniseg_monai", "check-data", str(datalist)], capture_output=True)
    assert run.returncode == 1 and b"share id 0" in run.stdout


def test_a_bug_while_reading_a_header_is_not_reported_as_a_bad_file(phantoms, monkeypatch):
    """Only what a bad file raises reads as "unreadable or corrupt"; a bug in the reading code keeps its traceback."""
    ct = str(phantoms.parent / "abdomen/abdomen_000_ct.nii.gz")
    assert check.case_header([ct]).channels == 1

    def bad_file(path: str):
        raise ImageFileError(f"Cannot work out file type of {path}")

    monkeypatch.setattr(check, "read_header", bad_file)
    with pytest.raises(InputError, match="unreadable or corrupt"):
        check.case_header([ct])

    def bug(path: str):
        raise KeyError("a bug")

    monkeypatch.setattr(check, "read_header", bug)
    with pytest.raises(KeyError, match="a bug"):
        check.case_header([ct])


@pytest.mark.integration
@pytest.mark.parametrize("defined", [True, False])
def test_a_datalist_task_name_that_is_not_an_identifier_is_refused(phantoms, tmp_path, defined):
    good = json.loads(phantoms.read_text())
    item = {**good["training"][0], "image": str(phantoms.parent / good["training"][0]["image"])}
    item["label"] = str(phantoms.parent / item["label"])
    tasks = {**good["tasks"], "../../evil": good["tasks"]["ph_organs"]} if defined else good["tasks"]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"tasks": tasks, "training": [item, {**item, "task": "../../evil"}]}))
    where = f'{datalist}: "tasks"' if defined else f"{datalist}: training[1]"
    problems = check_datalist(datalist, progress=False)
    assert len(problems) == 1 and f"{where.removeprefix(f'{datalist}: ')}: task name '../../evil'" in str(problems[0])
    for read in (registry_for_datalist, lambda path: load_items(path, "training", registry_for_datalist(phantoms))):
        with pytest.raises(ValueError, match=f"^{re.escape(where)}: task name '../../evil': use letters"):
            read(datalist)
    run = subprocess.run([sys.executable, "-m", "uniseg_monai", "check-data", str(datalist)], capture_output=True)
    assert run.returncode == 1 and b"task name '../../evil'" in run.stdout
    with pytest.raises(ValueError, match=re.escape("--task: task name '../up'")):
        prepare(tmp_path, "../up", tmp_path / "prepared.json")
    assert not (tmp_path / "prepared.json").exists()


def test_task_names_differing_only_in_case_and_a_case_name_leading_out_are_refused(phantoms, tmp_path):
    """Two task names equal but for letter case (their output files collide on case-insensitive file systems) and an
    item's ``case`` (it names output files) with a folder part: one problem naming the datalist, and the readers
    refuse it."""
    content = json.loads(phantoms.read_text())
    twin = {"PH_ORGANS": {**content["tasks"]["ph_organs"], "id": 9}}
    datalist = tmp_path / "twins.json"
    datalist.write_text(json.dumps({**content, "tasks": {**content["tasks"], **twin}}))
    message = "tasks 'ph_organs' and 'PH_ORGANS' differ only in letter case"
    with pytest.raises(TaskError, match=f"^{re.escape(f'{datalist}: {message}')}"):
        registry_for_datalist(datalist)
    assert [message in str(p) for p in check_datalist(datalist, progress=False)] == [True]

    escaping = tmp_path / "escaping.json"
    content["training"][0]["case"] = "../../esc"
    escaping.write_text(json.dumps(content))
    message = f"{escaping}: training[0]: 'case' '../../esc' must be a file name (no folder part"
    assert [str(p).startswith(message) for p in check_datalist(escaping, progress=False)] == [True]
    with pytest.raises(DatalistError, match=f"^{re.escape(message)}"):
        load_items(escaping, "training", registry_for_datalist(phantoms))


def absolute_items(phantoms: Path, task: str) -> list[dict]:
    """The phantom training items of ``task`` with absolute paths."""
    items = [i for i in json.loads(phantoms.read_text())["training"] if i["task"] == task]
    return [
        {**i, "image": str(phantoms.parent / i["image"]), "label": str(phantoms.parent / i["label"])} for i in items
    ]


def test_check_data_flags_repeated_cases_and_leaks_between_splits(phantoms, tmp_path):
    good = json.loads(phantoms.read_text())
    organs = absolute_items(phantoms, "ph_organs")
    liver = absolute_items(phantoms, "ph_liver")
    content = {
        "tasks": good["tasks"],
        "training": [organs[0], organs[1], organs[0], liver[0]],  # organs[0] twice; its CT under ph_liver is fine
        "validation": [organs[2]],
        "testing": [{"image": organs[2]["image"], "task": "ph_organs"}],  # a validation case is also a test case
    }
    datalist = tmp_path / "dl.json"
    datalist.write_text(json.dumps(content))
    found = [str(p) for p in check_datalist(datalist, progress=False)]
    twice = f"{organs[0]['image']}: is listed twice for task 'ph_organs': training[0] and training[2] of {datalist}"
    leaked = f"{organs[2]['image']}: is in both validation[0] and testing[0] of {datalist}"
    assert any(p.startswith(twice) for p in found) and any(p.startswith(leaked) for p in found), found
    assert len(found) == 2, found  # the same CT under two tasks of one split is not a problem


def test_a_zero_pixdim_without_qform_or_sform_is_refused_not_guessed(phantoms, tmp_path):
    """nibabel reads such a header as 1 mm voxels; README says a zero pixdim is refused: check-data and the
    header check of a run agree with it."""
    from uniseg_monai.data.check import check_run_items, read_header

    item = absolute_items(phantoms, "ph_organs")[0]
    unset = nib.Nifti1Image(np.asarray(nib.load(item["image"]).dataobj), None)
    unset.header.set_qform(None, code=0)
    unset.header.set_sform(None, code=0)
    unset.header["pixdim"][1:4] = [3.0, 3.0, 0.0]
    nib.save(unset, tmp_path / "unset.nii.gz")
    bad = {**item, "image": str(tmp_path / "unset.nii.gz")}
    assert read_header(bad["image"]).affine[:3, 2].tolist() == [0.0, 0.0, 0.0]
    datalist = tmp_path / "dl.json"
    datalist.write_text(json.dumps({"tasks": json.loads(phantoms.read_text())["tasks"], "training": [bad]}))
    found = [str(p) for p in check_datalist(datalist, progress=False)]
    assert any(p.startswith(f"{bad['image']}: singular affine") and "a zero pixdim" in p for p in found), found
    with pytest.raises(InputError, match=f"{bad['image']}: singular affine"):
        check_run_items([[bad]], registry_for_datalist(phantoms))


def test_channel_files_on_different_grids_name_both_files_and_the_difference(phantoms, tmp_path):
    item = absolute_items(phantoms, "ph_organs")[0]
    ct = nib.load(item["image"])
    affine = ct.affine.copy()
    affine[2, 3] += 2.5
    moved = write_like(Path(item["image"]), tmp_path / "pet.nii.gz", affine=affine)
    tasks = {"two": {"modalities": ["CT", "PET"], "labels": ["background", "liver"], "spacing": [3, 3, 4]}}
    datalist = tmp_path / "dl.json"
    datalist.write_text(json.dumps({"tasks": tasks, "testing": [{"image": [item["image"], moved], "task": "two"}]}))
    found = [str(p) for p in check_datalist(datalist, progress=False)]
    difference = f"affines differ by up to 2.5 (origin z: {affine[2, 3]:g} vs {ct.affine[2, 3]:g} mm)"
    assert any(
        p.startswith(f"{moved}: channel file is not on the grid of {item['image']}: {difference}") for p in found
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"ph_organs": {"spacing": ["3 mm", 3, 4]}}, "task 'ph_organs': spacing must be 3 positive numbers"),
        ({"ph_organs": {"spacing": [3, 3, None]}}, "task 'ph_organs': spacing must be 3 positive numbers"),
        (
            {"ph_organs": {"spacing": [3, 3, 1e-6]}},
            "task 'ph_organs': spacing must be 3 positive numbers (x, y, z) in mm, each 0.01-100",
        ),
        ({"ph_organs": {"label_map": {"one": 1}}}, "task 'ph_organs': label_map must map raw label values"),
        ({"ph_organs": {"label_map": [1, 2]}}, "task 'ph_organs': label_map must map raw label values"),
        # a value of the wrong kind is refused, not reinterpreted: "liver" is not 5 labels, 1.5 not class 1
        ({"ph_organs": {"labels": "liver"}}, "task 'ph_organs': labels must be a list of class names"),
        ({"ph_organs": {"modalities": "CT"}}, "task 'ph_organs': modalities must be a list of modality names"),
        ({"ph_organs": {"normalization": "ct"}}, "task 'ph_organs': normalization must be a list"),
        ({"ph_organs": {"short_labels": "bg"}}, "task 'ph_organs': short_labels must be a list of class names"),
        ({"ph_organs": {"label_map": {"1": 1.5}}}, "task 'ph_organs': label_map must map raw label values"),
        ({"ph_organs": {"label_map": {"1": True}}}, "task 'ph_organs': label_map must map raw label values"),
        ({"ph_organs": {"label_map": {"1.5": 1}}}, "task 'ph_organs': label_map must map raw label values"),
        ({"ph_organs": {"id": 1000000000}}, "task 'ph_organs': id must be an integer from 0 to 1023"),
        ({"ph_organs": {"id": True}}, "task 'ph_organs': id must be an integer"),
    ],
)
def test_a_bad_task_definition_in_a_datalist_is_one_line_naming_it(phantoms, tmp_path, spec, message):
    content = json.loads(phantoms.read_text())
    content["tasks"] = {**content["tasks"], **{n: {**content["tasks"][n], **s} for n, s in spec.items()}}
    datalist = tmp_path / "dl.json"
    datalist.write_text(json.dumps(content))
    with pytest.raises(TaskError) as refused:
        registry_for_datalist(datalist)
    assert str(refused.value).startswith(f"{datalist}: {message}") and "\n" not in str(refused.value)
    assert [str(p).splitlines()[0] for p in check_datalist(datalist, progress=False)] == [str(refused.value)]
    datalist.write_text(json.dumps({**content, "tasks": ["ph_organs"]}))
    with pytest.raises(DatalistError, match='"tasks" must map task names to objects of task keys'):
        registry_for_datalist(datalist)


def test_check_data_reports_sections_no_step_reads_and_a_task_without_foreground(phantoms, tmp_path):
    content = json.loads(phantoms.read_text())
    organs = [item for item in content["training"] if item["task"] == "ph_organs"][:2]
    task = {**content["tasks"]["ph_organs"], "label_map": {"1": 0, "2": 0}}  # every label value to background
    datalist = phantoms.parent / "nofg.json"
    datalist.write_text(json.dumps({"tasks": {"ph_organs": task}, "training": organs, "validaton": []}))
    found = [str(p) for p in check_datalist(datalist, progress=False)]
    assert found == [
        f"{datalist}: unknown top-level key 'validaton': no step reads it\n    fix: rename it to 'validation'",
        f"{datalist}: no foreground in any training case of task 'ph_organs'\n    fix: check the label files and the "
        "task's 'label_map' (raw values it does not list become background)",
    ]
    datalist.write_text(json.dumps({"training": "abc"}))
    assert [str(p).splitlines()[0] for p in check_datalist(datalist, progress=False)] == [
        f'{datalist}: "training" must be a list of items ({{"image", "label", "task"}} objects), got \'abc\''
    ]


def test_check_data_refuses_a_header_claiming_more_voxels_than_the_file_holds(phantoms, tmp_path):
    """A 4 kB file whose header claims 4000^3 float32 voxels is one problem from its header, not a MemoryError."""
    import gzip

    header = nib.Nifti1Header()
    header.set_data_shape((4000,) * 3)
    header.set_data_dtype(np.float32)
    huge = tmp_path / "huge.nii.gz"
    huge.write_bytes(gzip.compress(header.binaryblock + bytes(4) + np.random.default_rng(0).bytes(4096)))
    content = json.loads(phantoms.read_text())
    datalist = tmp_path / "dl.json"
    testing = [{"image": str(huge), "task": "ph_organs"}]
    datalist.write_text(json.dumps({"tasks": content["tasks"], "testing": testing}))
    found = [str(p) for p in check_datalist(datalist, progress=False)]
    assert found[1].startswith(
        f"{huge}: unreadable or corrupt (its header claims 1 x (4000, 4000, 4000) voxels of float32 (238 GiB), more "
        "than its"
    ) and found[1].splitlines()[0].endswith("bytes can hold: the file is truncated or its header is wrong)")


def _msd_folder(root: Path, folder: Path, cases: int = 5) -> Path:
    """An MSD task folder of ``cases`` phantom abdomen CTs (labels: liver, spleen) and one test image."""
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True)
    for i in range(cases):
        shutil.copy(root / f"abdomen/abdomen_00{i}_ct.nii.gz", folder / f"imagesTr/spleen_{i}.nii.gz")
        shutil.copy(root / f"abdomen/abdomen_00{i}_organs.nii.gz", folder / f"labelsTr/spleen_{i}.nii.gz")
    shutil.copy(root / "abdomen/abdomen_009_ct.nii.gz", folder / "imagesTs/spleen_9.nii.gz")
    meta = {
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "spleen"},
        "training": [
            {"image": f"./imagesTr/spleen_{i}.nii.gz", "label": f"./labelsTr/spleen_{i}.nii.gz"} for i in range(cases)
        ],
        "test": ["./imagesTs/spleen_9.nii.gz"],
    }
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"val_fraction": 1.5}, "--val_fraction must be a number from 0 up to (not including) 1"),
        ({"val_fraction": -1}, "--val_fraction must be a number from 0 up to (not including) 1"),
        ({"val_fraction": "abc"}, "--val_fraction must be a number from 0 up to (not including) 1"),
        ({"test_fraction": 1}, "--test_fraction must be a number from 0 up to (not including) 1"),
        ({"test_fraction": 0.5, "val_fraction": 0.9}, "leave none of the 4 labelled cases for training"),
    ],
)
def test_prepare_refuses_shares_that_leave_no_training_or_overlap(phantoms, tmp_path, change, message):
    msd, out = _msd_folder(phantoms.parent, tmp_path / "Task01", cases=4), tmp_path / "datalist.json"
    with pytest.raises(ValueError, match=re.escape(message)):
        prepare(msd, "mine", out, **change)
    assert not out.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("{", "not valid JSON"),
        ({"labels": {"bg": "background", "l": "liver"}}, '"labels" must map label values to names'),
        ({"labels": ["background", "liver"]}, '"labels" must map label values to names'),
        ({"modality": ["CT"]}, '"modality" must map channel numbers to names'),
        ({"training": [{"label": "./labelsTr/spleen_0.nii.gz"}]}, 'training[0] needs "image" and "label" file paths'),
        ({"test": [{"label": "x"}]}, "test[0] must be an image path"),
        # a task its own checks would refuse later: refused before anything is written, naming the key
        ({"labels": {}}, "task 'mine': labels must list background and at least one class, got []; fix its \"labels\""),
        ({"modality": {"0": "CT", "1": "CT", "2": "CT"}}, "task 'mine': 3 modalities; UniSeg has stems for 1, 2 or 4"),
    ],
)
def test_prepare_refuses_a_dataset_json_it_cannot_use_in_one_line(phantoms, tmp_path, change, message):
    msd, out = _msd_folder(phantoms.parent, tmp_path / "Task01", cases=2), tmp_path / "datalist.json"
    meta = json.loads((msd / "dataset.json").read_text())
    (msd / "dataset.json").write_text(change if isinstance(change, str) else json.dumps({**meta, **change}))
    with pytest.raises(DatalistError) as refused:
        prepare(msd, "mine", out)
    assert str(refused.value).startswith(f"{msd / 'dataset.json'}: ") and "\n" not in str(refused.value)
    assert message in str(refused.value) and not out.exists()


@pytest.mark.parametrize(
    ("task", "modality", "expected"),
    [
        ("brats21", {"0": "CT"}, "task 'brats21' expects 4 (T1+T1ce+T2+FLAIR); give the task these images are for, "
                                 "or a new --task name (defined from dataset.json)"),
        ("mine", {"0": "CT", "1": "MR"}, "task 'mine' expects 2 (CT+MR); fix \"modality\" in {meta} (nnU-Net v2: "
                                         "\"channel_names\")"),
    ],
    ids=["built-in task", "new task"],
)  # fmt: skip
def test_prepare_refuses_data_whose_channels_are_not_the_tasks_modalities(phantoms, tmp_path, task, modality, expected):
    """The channel count of the images' headers against the task's modalities (built-in, or new from
    dataset.json), before anything is written: check-data would refuse every case."""
    msd, out = _msd_folder(phantoms.parent, tmp_path / "Task01", cases=2), tmp_path / "datalist.json"
    meta = json.loads((msd / "dataset.json").read_text())
    (msd / "dataset.json").write_text(json.dumps({**meta, "modality": modality}))
    with pytest.raises(DatalistError) as refused:
        prepare(msd, task, out)
    message = expected.format(meta=msd / "dataset.json")
    assert str(refused.value) == f"{msd}: ./imagesTr/spleen_0.nii.gz has 1 channel(s), but {message}"
    assert not out.exists()


def test_prepare_names_out_when_it_is_no_datalist_to_add_to(phantoms, tmp_path):
    """OUT is merged into when it exists: a model file or a folder there is named as OUT, and left as it was."""
    msd = _msd_folder(phantoms.parent, tmp_path / "Task01", cases=2)
    model, folder = tmp_path / "up.model", tmp_path / "lists"
    model.write_bytes(b"\x80\x02not json")
    folder.mkdir()
    with pytest.raises(DatalistError) as refused:
        prepare(msd, "spleen", model)
    assert str(refused.value).startswith(f"OUT {model} exists and is not a datalist to add to (not valid JSON")
    assert str(refused.value).endswith("give a new file or an existing datalist")
    assert model.read_bytes() == b"\x80\x02not json"
    with pytest.raises(UsageError, match="is a folder: give the datalist file"):
        prepare(msd, "spleen", folder)
    assert not any(folder.iterdir())


def _raise_first(problems: list) -> None:
    """check-data's first problem as the error a command would print."""
    raise UniSegError(f"{problems[0].where}: {problems[0].what}")


NOT_UTF8 = b"\x00\xff\xfe{}"  # a binary file, or JSON exported in another encoding


@pytest.mark.parametrize(
    ("file", "read"),
    [
        ("datalist.json", lambda folder: _raise_first(check_datalist(folder / "datalist.json"))),
        ("datalist.json", lambda folder: registry_for_datalist(folder / "datalist.json")),
        ("tasks.json", load_model_tasks),
        ("dataset.json", lambda folder: prepare(folder, "mine", folder / "out.json")),
        ("summary.json", write_report),
        ("configs/metadata.json", lambda folder: (folder / "configs/inference.json").touch() or sync_metadata(folder)),
        ("templates/finetune_bundles.json", read_table),
    ],
)
def test_every_json_file_the_user_gives_that_is_not_utf8_text_is_one_line_naming_it(tmp_path, file, read):
    (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / file).write_bytes(NOT_UTF8)
    with pytest.raises(UniSegError) as refused:
        read(tmp_path)
    assert f"{tmp_path / file}: not valid JSON (not UTF-8 text (byte 0xff)" in str(refused.value)
    assert "\n" not in str(refused.value)


def test_prepare_msd_and_nnunet_folders_merge_into_one_datalist(phantoms, tmp_path):
    root = phantoms.parent
    msd = _msd_folder(root, tmp_path / "Task09_Spleen")
    nnunet = tmp_path / "Dataset003_PetCt"
    for sub in ("imagesTr", "labelsTr"):
        (nnunet / sub).mkdir(parents=True)
    for i in range(3):
        shutil.copy(root / f"petct/petct_00{i}_ct.nii.gz", nnunet / f"imagesTr/pc_{i}_0000.nii.gz")
        shutil.copy(root / f"petct/petct_00{i}_pet.nii.gz", nnunet / f"imagesTr/pc_{i}_0001.nii.gz")
        shutil.copy(root / f"petct/petct_00{i}_lesions.nii.gz", nnunet / f"labelsTr/pc_{i}.nii.gz")
    nn_meta = {
        "channel_names": {"0": "CT", "1": "PET"},
        "labels": {"background": 0, "lesion": 1},
        "file_ending": ".nii.gz",
    }
    (nnunet / "dataset.json").write_text(json.dumps(nn_meta))

    out = tmp_path / "lists" / "datalist.json"
    assert prepare(msd, "my_abdomen", out, fmt="msd") == {"training": 4, "validation": 1, "testing": 1}
    assert prepare(nnunet, "autopet", out, fmt="nnunet", val_fraction=0.34) == {
        "training": 2,
        "validation": 1,
        "testing": 0,
    }
    prepare(msd, "my_abdomen", out, fmt="msd")  # re-running replaces, never duplicates
    data = json.loads(out.read_text())
    assert len(data["training"]) == 6 and set(data["tasks"]) == {"my_abdomen"}  # autopet is built in
    task = data["tasks"]["my_abdomen"]
    assert task["labels"] == ["background", "liver", "spleen"] and task["normalization"] == ["ct"]
    assert task["spacing"][2] == pytest.approx(4.0, rel=0.2)
    registry = registry_for_datalist(out)
    items = load_items(out, "training", registry)
    petct = [i for i in items if i["task"] == "autopet"]
    assert len(petct[0]["image"]) == 2 and petct[0]["image"][1].endswith("_0001.nii.gz")
    assert all(Path(p).exists() for i in items for p in ([i["image"]] if isinstance(i["image"], str) else i["image"]))
    assert check_datalist(out, progress=False) == []


def test_prepare_reads_the_btcv_and_vs_release_layouts(tmp_path):
    btcv = generate_downstream_phantoms(tmp_path / "RawData", "btcv", cases=10, spacing=[4.0, 4.0, 6.0])
    vs = generate_downstream_phantoms(tmp_path / "VS", "vs", cases=5, spacing=[1.0, 1.0, 2.0])
    out = tmp_path / "datalist.json"
    # the paper's BTCV split: 30 % test (9 of 30); the rest 80 / 20 training / validation
    assert prepare(btcv, "btcv", out, fmt="btcv") == {"training": 6, "validation": 1, "testing": 3}
    assert prepare(vs, "my_vs", out, fmt="vs", val_fraction=0.25, test_fraction=0.2) == {
        "training": 3,
        "validation": 1,
        "testing": 1,
    }
    data = json.loads(out.read_text())
    assert set(data["tasks"]) == {"my_vs"}  # btcv is built in; a new name copies the built-in vs task
    assert data["tasks"]["my_vs"]["short_labels"] == ["bg", "VS"]
    assert data["tasks"]["my_vs"]["spacing"] == pytest.approx([1.0, 1.0, 2.0], rel=0.2)
    vs_items = [i for s in ("training", "validation", "testing") for i in data[s] if i["task"] == "my_vs"]
    assert [i["case"] for i in vs_items] == [f"vs_gk_{n}" for n in range(1, 6)]  # file names repeat per case
    btcv_test = [i for i in data["testing"] if i["task"] == "btcv"]
    assert [Path(i["label"]).name for i in btcv_test] == ["label0008.nii.gz", "label0009.nii.gz", "label0010.nii.gz"]
    assert check_datalist(out, progress=False) == []
    (btcv / "Training" / "label" / "label0003.nii.gz").unlink()
    with pytest.raises(DatalistError, match=r"img0003\.nii\.gz: no label"):
        prepare(btcv, "btcv", out, fmt="btcv")


def test_loading_an_image_does_not_announce_the_absent_gpu_dicom_decoder():
    """MONAI builds its nvImageCodec DICOM reader in every LoadImage; without nvImageCodec (a CPU install with
    pydicom) it logs and warns once per loader. Importing the package silences both, unless the user chose it."""
    code = "import uniseg_monai; from monai.transforms import LoadImage; LoadImage(); LoadImage()"
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert quiet.returncode == 0 and "nvImageCodec" not in quiet.stderr, quiet.stderr
    chosen = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(MONAI_DICOM_READER="nvimgcodec")
    )
    assert "nvImageCodec" in chosen.stderr  # the user asked for that reader: its notices stay


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MONAI_DICOM_READER"}
    return {**env, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **extra}


def test_a_folder_without_dicoms_is_our_one_line_without_itks_warning_output(tmp_path):
    """ITK's series reader prints a multi-line "WARNING: In .../itkGDCMSeriesFileNames.cxx ... No Series were
    found" to stderr before our error; where ITK reads (check-data, the loaders of predict and bundles) it is off."""
    (tmp_path / "notes.txt").write_text("no DICOM here")
    code = (
        "import sys; from uniseg_monai.data.check import read_volume; "
        "from uniseg_monai.data.transforms import ThreadSafeLoadImaged\n"
        "for read in (read_volume, lambda f: ThreadSafeLoadImaged(['image'])({'image': f})):\n"
        "    try: read(sys.argv[1])\n"
        "    except Exception as err: print(type(err).__name__, err)"
    )
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=_env())
    assert run.stdout.count(f"no DICOMs in: {tmp_path}") == 2, run.stdout + run.stderr
    assert "WARNING" not in run.stderr and "No Series" not in run.stderr, run.stderr


@pytest.mark.integration
def test_check_data_draws_no_progress_bar_into_a_log(phantoms, tmp_path):
    """Off a terminal (a pipe, a log file) tqdm's bars are carriage-return fragments: ours (core/progress.py) and
    the bundles' ignite ProgressBar ("disable": null) draw only on a terminal."""
    good = json.loads(phantoms.read_text())
    item = {k: str(phantoms.parent / v) for k, v in good["training"][0].items() if k in ("image", "label")}
    datalist = tmp_path / "dl.json"
    datalist.write_text(
        json.dumps({"tasks": good["tasks"], "training": [{**item, "task": good["training"][0]["task"]}]})
    )
    run = subprocess.run(
        [sys.executable, "-m", "uniseg_monai", "check-data", str(datalist)], capture_output=True, text=True, env=_env()
    )
    assert "\r" not in run.stderr and "check-data:" not in run.stderr, run.stderr
    bars = [
        handler
        for config in Path(__file__).resolve().parents[1].glob("bundles/*/configs/*.json")
        for handler in json.loads(config.read_text()).get("train", {}).get("handlers", [])
        if isinstance(handler, dict) and handler.get("_target_", "").endswith("ProgressBar")
    ]
    assert bars and all("disable" in bar and bar["disable"] is None for bar in bars)
