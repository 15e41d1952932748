"""Bundles as model-zoo ships them: the inference workflow checked with no data (model-zoo CI's property check),
zips that ``python -m monai.bundle download`` unpacks and that then run, and ``--bundle`` names that resolve from
any folder with one-line errors."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import pytest
from conftest import BUNDLES, shared_path, tiny_bundle
from fire import docstrings
from monai.bundle import create_workflow, verify_metadata
from monai.bundle.properties import InferProperties, MetaProperties
from nnunet_v1 import nnunet_v1_container, save_nnunet_v1

from uniseg_monai import cli
from uniseg_monai.apps.bundles import BundleNotFoundError, find_bundle, pack_bundle
from uniseg_monai.apps.predict import predict
from uniseg_monai.cli import main
from uniseg_monai.core.errors import UsageError, user_error
from uniseg_monai.model_io.model_files import convert_official

NAMES = ["uniseg_pretrain", "uniseg_finetune_btcv", "uniseg_finetune_vs"]


def uniseg(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "uniseg_monai", *args], capture_output=True, encoding="utf-8", cwd=cwd, env=env
    )


@pytest.mark.integration
@pytest.mark.parametrize("name", NAMES)
def test_inference_workflow_passes_model_zoo_checks_without_data(name, tmp_path):
    """As model-zoo's ci/verify_bundle.py: create the inference workflow from the bundle with no data and no
    weights (dataset_dir does not exist), then check the inference properties."""
    bundle = BUNDLES / name
    workflow = create_workflow(
        workflow_type="inference",
        bundle_root=str(bundle),
        config_file=str(bundle / "configs" / "inference.json"),
        logging_file=str(bundle / "configs" / "logging.conf"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        dataset_dir=str(tmp_path / "no_data_here"),
    )
    workflow.properties = {**MetaProperties, **InferProperties}
    assert workflow.check_properties() == []
    assert workflow.dataset_data == []  # nothing to segment, and no error for it until it runs
    with pytest.raises(Exception) as refused:
        workflow.run()
    assert f"--dataset_dir {tmp_path / 'no_data_here'} does not exist: nothing to segment" in str(
        user_error(refused.value)
    )


@pytest.fixture(scope="module")
def zips(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    return {name: pack_bundle(BUNDLES / name, out) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_bundle_zip_has_the_github_release_layout(zips, name):
    version = json.loads((BUNDLES / name / "configs" / "metadata.json").read_text())["version"]
    assert zips[name].name == f"{name}_v{version}.zip"
    with zipfile.ZipFile(zips[name]) as archive:
        names = archive.namelist()
    assert all(n.startswith(f"{name}/") for n in names)
    assert f"{name}/configs/inference.json" in names and f"{name}/large_files.yml" in names
    assert f"{name}/LICENSE" in names and f"{name}/docs/README.md" in names
    assert not [n for n in names if n.endswith((".pt", ".pyc")) or "/eval/" in n]  # no weights, no run outputs


@pytest.mark.integration
def test_downloaded_bundle_verifies_and_segments_a_real_scan(zips, official_fixture, tmp_path):
    """`monai.bundle download --url file://` unpacks the zip; its metadata verifies offline; `uniseg predict` with the
    unpacked bundle (by name, from $UNISEG_HOME) and a converted official model segments a real CT."""
    home = tmp_path / "home"
    run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "download", "--name", "uniseg_pretrain", "--bundle_dir",
         str(home / "bundles"), "--url", zips["uniseg_pretrain"].as_uri()],
        capture_output=True, encoding="utf-8",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    unpacked = home / "bundles" / "uniseg_pretrain"
    verify_metadata(
        meta_file=str(unpacked / "configs" / "metadata.json"),
        filepath=str(shared_path("schemas/meta_schema_20240725.json")),
    )
    weights = tmp_path / "weights" / "uniseg.pt"
    src = save_nnunet_v1(nnunet_v1_container(official_fixture["upstream_state_dict"]), tmp_path / "official.model")
    convert_official(src, weights)
    ct = shared_path("data/real_samples/totalseg_examples/ct_abdomen_3mm_crop.nii.gz")
    cwd = tmp_path / "cwd"  # no ./bundles here; the source tree's copy is hidden by naming a bundle only home has
    (unpacked.parent / "uniseg_home_copy").symlink_to(unpacked, target_is_directory=True)
    cwd.mkdir()
    env = {**os.environ, "UNISEG_HOME": str(home)}
    done = uniseg("predict", "-i", str(ct), "-o", "seg", "--task", "liver", "--bundle", "uniseg_home_copy",
                  "--checkpoint", str(weights), "--device", "cpu", cwd=cwd, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    sidecar = json.loads((cwd / "seg" / "ct_abdomen_3mm_crop_liver.json").read_text())
    assert sidecar["bundle"] == str((unpacked.parent / "uniseg_home_copy").resolve())
    seg, image = nib.load(cwd / "seg" / "ct_abdomen_3mm_crop_liver.nii.gz"), nib.load(ct)
    assert seg.shape == image.shape and (seg.affine == image.affine).all()


def test_bundle_names_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UNISEG_HOME", str(tmp_path / "home"))
    assert find_bundle("uniseg_pretrain").resolve() == (BUNDLES / "uniseg_pretrain").resolve()  # the source tree
    local = tmp_path / "bundles" / "uniseg_pretrain" / "configs"
    local.mkdir(parents=True)
    (local / "inference.json").write_text("{}")
    assert find_bundle("uniseg_pretrain") == Path("bundles") / "uniseg_pretrain"  # ./bundles/NAME comes first
    with pytest.raises(BundleNotFoundError, match="looked in") as err:
        find_bundle("no_such_bundle")
    assert str(tmp_path / "home" / "bundles" / "no_such_bundle") in str(err.value)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["predict", "-i", "X", "-o", "seg", "--task", "liver", "--bundle", "no_such_bundle"], "looked in"),
        (["predict", "-i", "X", "-o", "seg", "--task", "liver", "--bundle", "BUNDLE"], "uniseg weights --bundle"),
        (["predict", "-i", "X", "-o", "seg", "--task", "nope", "--checkpoint", "WEIGHTS"], "unknown task 'nope'"),
        (["predict", "-i", "X", "-o", "seg", "--task", "liver", "--checkpoint", "WEIGHTS", "--no_id", "1"], "no_id"),
        (["weights", "--bundle", "no_such_bundle"], "looked in"),
        (["weights", "--bundle", "BUNDLE", "--url", "/no/such/file.model"], "not found"),
        (["convert-official", "/no/such/file.model", "out.pt"], "not found"),
        (["export", "--bundle", "BUNDLE", "--onnx", "x.onnx"], "uniseg weights --bundle"),
        (["weights", "--bundle", "123"], "looked in"),  # fire's int, a string again
        (["weights", "--bundle", "BUNDLE", "--overwrite=maybe"], "--overwrite takes true or false"),
        (["weights", "--bundle", "BUNDLE", "--url", "WEIGHTS", "--dry_run"], "unknown option --dry_run"),
        (["predict", "-i", "12345", "-o", "seg", "--task", "liver", "--checkpoint", "WEIGHTS"], "input 12345 not"),
        (["predict", "-i", "X", "-o", "seg", "--task", "liver", "--checkpoint", "WEIGHTS", "--device", "gpu"], "gpu"),
        (
            ["predict", "-i", "X", "-o", "seg", "--task", "liver", "--checkpoint", "WEIGHTS", "--overlap", "1.5"],
            "[0, 1)",
        ),
        (["predict", "-i", "X", "-o", "WEIGHTS", "--task", "liver", "--checkpoint", "WEIGHTS"], "is a file"),
        (["predict", "-o", "seg", "--task", "liver"], "`uniseg predict`: missing --input (see `uniseg predict --help`"),
        (["check-data"], "missing --datalist"),
        (
            ["predict", "-i", "X", "-o", "seg", "--task", "liver", "--checkpoint", "WEIGHTS", "--patch_size=[63,64,8]"],
            "--patch_size [63, 64, 8] is not divisible by the network's total stride [32, 32, 16]: set --patch_size "
            "to multiples of it, e.g. [64, 64, 16]",
        ),
        (["nosuchcommand"], "unknown command 'nosuchcommand'; commands: convert-official, weights,"),
        (["PREDICT"], "unknown command 'PREDICT' (did you mean predict?)"),
    ],
)
def test_user_errors_are_one_line(official_fixture, tmp_path, monkeypatch, capsys, args, expected):
    """Every user error of predict, weights, convert-official and export: exit 2, one line naming the fix, nothing
    written (the CLI's main in this process: the same code path as the `uniseg` script, without its start-up)."""
    bundle = shutil.copytree(BUNDLES / "uniseg_pretrain", tmp_path / "bundle")
    weights = tmp_path / "weights.pt"
    src = save_nnunet_v1(nnunet_v1_container(official_fixture["upstream_state_dict"]), tmp_path / "official.model")
    convert_official(src, weights)
    scan = shared_path("data/real_samples/totalseg_examples/ct_abdomen_3mm_crop.nii.gz")
    swap = {"X": str(scan), "BUNDLE": str(bundle), "WEIGHTS": str(weights)}
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main([swap.get(a, a) for a in args])
    stderr = capsys.readouterr().err
    assert done.value.code == 2, stderr[-2000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("uniseg: error:") and expected in lines[0], stderr[-2000:]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # refused before acting


def test_only_user_errors_are_one_line(monkeypatch, capsys):
    """A UniSegError is the user's (exit 2, one line); any other exception, a ValueError included, is a bug and keeps
    its traceback. Short flags reach the command spelled out, in both forms."""
    seen = []

    def command(error: type[Exception]):
        def run(**kwargs):
            seen.append(kwargs)
            raise error("boom")

        return run

    monkeypatch.setattr(cli, "_check_options", lambda command, argv: None)
    monkeypatch.setitem(cli.COMMANDS, "predict", command(UsageError))
    with pytest.raises(SystemExit) as done:
        main(["predict", "-i", "a", "-o=b"])
    assert done.value.code == 2 and capsys.readouterr().err.strip() == "uniseg: error: boom"
    monkeypatch.setitem(cli.COMMANDS, "predict", command(ValueError))
    with pytest.raises(ValueError, match="boom"):
        main(["predict", "-i", "a", "-o", "b"])
    assert seen == [{"input": "a", "output": "b"}] * 2


@pytest.mark.integration
def test_help_of_commands_that_pass_settings_through():
    run = uniseg("export", "--help", cwd=BUNDLES.parent)
    assert run.returncode == 0 and "--onnx" in run.stdout + run.stderr


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["predict", "--help"], ["tasks", "-h"]])
def test_help_starts_with_the_help_not_a_notice_of_fire(args, capsys):
    """fire prefixes a help asked with a plain --help by "INFO: Showing help with the command 'uniseg -- --help'."."""
    try:
        main(args)
    except SystemExit as done:
        assert done.code in (0, None)
    shown = capsys.readouterr()
    assert (shown.out + shown.err).lstrip().startswith("NAME") and "INFO:" not in shown.out + shown.err


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_help_texts_are_whole_sentences(command):
    """fire builds `uniseg --help` and `uniseg COMMAND --help` from the docstrings with its own parser, which keeps
    a wrapped argument line only up to its first colon and reads text after the Args section as more arguments:
    each summary and each option's text, as fire parses them, must end a sentence, every option documented."""
    function = cli.COMMANDS[command]
    info = docstrings.parse(inspect.getdoc(function))
    parameters = list(inspect.signature(function).parameters)
    assert info.summary.rstrip().endswith("."), info.summary
    described = {arg.name: arg.description for arg in info.args or []}
    assert list(described) == parameters
    for name, text in described.items():
        assert text.rstrip().endswith("."), f"--{name}: {text}"


@pytest.mark.integration
def test_weights_keeps_what_the_user_has(official_fixture, tmp_path):
    """--overwrite=false keeps model.pt; a relative --url works; errors name the URL (not a temporary file); a
    large_files.yml path outside the bundle is refused; installed files get the usual permissions."""
    bundle = tiny_bundle(official_fixture, "upstream", "uniseg_pretrain", tmp_path)
    save_nnunet_v1(nnunet_v1_container(official_fixture["upstream_state_dict"]), tmp_path / "official.model")
    first = uniseg("weights", "--bundle", str(bundle), "--url", "official.model", cwd=tmp_path)  # relative path
    assert first.returncode == 0, first.stderr[-2000:]
    model_pt = bundle / "models" / "model.pt"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(model_pt.stat().st_mode) == 0o666 & ~umask
    before = model_pt.read_bytes()
    kept = uniseg("weights", "--bundle", str(bundle), "--url", "official.model", "--overwrite=false", cwd=tmp_path)
    assert kept.returncode == 2 and "--overwrite" in kept.stderr and model_pt.read_bytes() == before

    downstream = save_nnunet_v1(nnunet_v1_container(official_fixture["downstream_state_dict"]), tmp_path / "d.model")
    wrong = uniseg("weights", "--bundle", str(bundle), "--url", downstream.as_uri(), "--overwrite", cwd=tmp_path)
    assert wrong.returncode == 2 and downstream.as_uri() in wrong.stderr and ".download-" not in wrong.stderr
    assert model_pt.read_bytes() == before

    (bundle / "large_files.yml").write_text(
        'large_files:\n  - {path: "../../outside.pt", url: "official.model", hash_val: "", hash_type: sha256}\n'
    )
    escape = uniseg("weights", "--bundle", str(bundle), cwd=tmp_path)
    assert escape.returncode == 2 and "leaves the bundle folder" in escape.stderr
    assert not (tmp_path.parent / "outside.pt").exists()


@pytest.mark.integration
def test_predict_never_replaces_earlier_outputs_silently(official_fixture, tmp_path):
    src = save_nnunet_v1(nnunet_v1_container(official_fixture["upstream_state_dict"]), tmp_path / "official.model")
    weights = tmp_path / "uniseg.pt"
    convert_official(src, weights)
    ct = shared_path("data/real_samples/totalseg_examples/ct_abdomen_3mm_crop.nii.gz")
    out = tmp_path / "seg"
    out.mkdir()
    mine = out / "ct_abdomen_3mm_crop_liver.nii.gz"
    mine.write_bytes(b"my manual ground truth")
    args = [str(ct), str(out), "liver"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        predict(*args, checkpoint=str(weights), device="cpu")
    assert mine.read_bytes() == b"my manual ground truth"
    assert predict(*args, checkpoint=str(weights), device="cpu", overwrite=True) == 0
    assert nib.load(mine).shape == nib.load(ct).shape


def test_bundle_zip_leaves_every_weights_file_out(tmp_path):
    bundle = shutil.copytree(BUNDLES / "uniseg_finetune_vs", tmp_path / "uniseg_finetune_vs")
    for name in ("model.pt", "pretrained.pt", "model_final_checkpoint.model", "x.pth", "model_provenance.json"):
        (bundle / "models" / name).write_bytes(b"weights")
    with zipfile.ZipFile(pack_bundle(bundle, tmp_path / "dist")) as archive:
        models = [n for n in archive.namelist() if "/models/" in n]
    assert models == ["uniseg_finetune_vs/models/tasks.json"]
    version = json.loads((bundle / "configs" / "metadata.json").read_text())["version"]
    assert sorted(p.name for p in (tmp_path / "dist").iterdir()) == [f"uniseg_finetune_vs_v{version}.zip"]  # no temp


LIST_OPTIONS = [
    (command, f"--{name}")
    for command, run in cli.COMMANDS.items()
    for name, parameter in inspect.signature(run).parameters.items()
    if any(hint in str(parameter.annotation) for hint in cli.LIST_HINTS)
] + [(command, "--patch_size") for command in ("predict", "export")]  # bundle ids: passed to the bundle's config


@pytest.mark.parametrize(("command", "option"), LIST_OPTIONS)
@pytest.mark.parametrize("spelling", ["separate", "equals"])
def test_a_list_option_written_as_separate_numbers_is_one_line_naming_it(command, option, spelling, capsys):
    """fire takes `--patch_size 63 63 15` as 63 and two positional arguments of other options ("--tta takes true
    or false, got 15"): every list option of every command (and the bundle ids of predict and export) is refused
    before the command runs, with the spelling that works."""
    words = [option, "63", "63", "15"] if spelling == "separate" else [f"{option}=63", "63", "15"]
    with pytest.raises(SystemExit) as done:
        main([command, *words])
    lines = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and lines == [
        f"uniseg: error: {option} takes one value: write [63,63,15] or 63,63,15 (no spaces), got 63 63 15"
    ]
