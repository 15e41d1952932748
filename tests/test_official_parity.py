"""Parity with the official UniSeg implementation, through ../shared/fixtures/official_uniseg."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import shared_path, tiny_bundle, zyx_to_xyz
from network_outputs import all_heads

from uniseg_monai.model_io.model_files import build_network
from uniseg_monai.model_io.official import convert_state_dict, infer_network_def, official_key
from uniseg_monai.networks import UniSeg, UniSegBackbone
from uniseg_monai.tasks import PAPER_UPSTREAM_TASKS

KINDS = {"upstream": "upstream_cases", "downstream": "downstream_cases"}


def converted(fixture: dict, kind: str) -> torch.nn.Module:
    state = fixture[f"{kind}_state_dict"]
    net = build_network(infer_network_def(state))
    net.load_state_dict(convert_state_dict(state), strict=True)
    return net.eval()


def float32_tolerance(reference: torch.Tensor) -> float:
    """1e-4, relative to the output's scale: logits reach |9|, float32 carries ~1e-7 relative per op, and the
    reference was computed with other CPU kernels (up to 4.4e-5 measured here with SSE4.1-only oneDNN and ATen
    kernels on 2 threads; a wrong layer gives 1e-2 and more)."""
    return 1e-4 * max(1.0, reference.abs().max().item())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.exactness
def test_converted_checkpoint_matches_official_outputs(official_fixture, kind):
    net = converted(official_fixture, kind)
    for case in official_fixture[KINDS[kind]]:
        outputs = all_heads(net, zyx_to_xyz(case["input"]), case.get("task_id"))
        assert len(outputs) == len(case["outputs"]) == 5
        for ours, ref in zip(outputs, case["outputs"]):
            ours = zyx_to_xyz(ours)
            assert ours.shape == ref.shape
            assert (ours - ref).abs().max().item() <= float32_tolerance(ref)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.exactness
def test_official_axis_order_reproduces_reference_exactly(official_fixture, kind):
    """Built in (z, y, x) order with the official (unpermuted) weights, our layers compute what the official
    ones do to float32 rounding (:func:`float32_tolerance`; conv kernels differ per CPU: 1.5e-5 and 2.9e-5
    absolute were measured on two Xeons): the structure (stems, FUSE, prompt selection, decoder, heads) is the same."""
    state = official_fixture[f"{kind}_state_dict"]
    network_def = infer_network_def(state)
    for key in ("kernel_sizes", "strides"):
        network_def[key] = [k[::-1] for k in network_def[key]]
    if "patch_size" in network_def:
        network_def["patch_size"] = network_def["patch_size"][::-1]
    net = build_network(network_def).eval()
    net.load_state_dict({official_key(k): v for k, v in state.items()}, strict=True)
    single_sample_cases = [c for c in official_fixture[KINDS[kind]] if c["input"].shape[0] == 1]
    assert single_sample_cases
    for case in single_sample_cases:
        for ours, ref in zip(all_heads(net, case["input"], case.get("task_id")), case["outputs"]):
            assert (ours - ref).abs().max().item() <= float32_tolerance(ref)


def test_inferred_architecture_matches_fixture_config(official_fixture):
    config = official_fixture["config"]
    up = infer_network_def(official_fixture["upstream_state_dict"])
    down = infer_network_def(official_fixture["downstream_state_dict"])
    assert up["_target_"].endswith(".UniSeg") and down["_target_"].endswith(".UniSegBackbone")
    assert up["num_tasks"] == config["n_tasks"]
    assert up["patch_size"] == config["patch_size"][::-1]
    assert up["in_channels"] == down["in_channels"] == config["in_channels"]
    assert up["num_classes"] == config["num_classes"]
    assert down["num_classes"] == official_fixture["downstream_num_classes"]
    assert up["kernel_sizes"] == [k[::-1] for k in config["conv_kernels"]]
    assert up["strides"] == [[1, 1, 1]] + [k[::-1] for k in config["pool_kernels"]]
    assert up["features"][0] == config["base_features"] and max(up["features"]) == config["max_features"]
    assert up["fuse_blocks"] == config["fuse_blocks"]


def random_state_from_key_list(name: str) -> dict[str, torch.Tensor]:
    state = {}
    for line in shared_path(f"fixtures/official_uniseg/{name}").read_text().splitlines():
        key, shape, _ = line.split("\t")
        state[key] = torch.randn(*[int(v) for v in re.findall(r"\d+", shape)])
    return state


@pytest.mark.parametrize(
    ("name", "expected", "default_net"),
    [
        ("official_upstream_state_dict_keys.txt", 32_114_381, lambda: UniSeg()),
        ("official_downstream_state_dict_keys.txt", 31_178_976, lambda: UniSegBackbone(num_classes=14)),
    ],
)
def test_full_size_official_key_lists_convert_completely(name, expected, default_net):
    state = random_state_from_key_list(name)
    net = build_network(infer_network_def(state))
    converted_state = convert_state_dict(state)
    net.load_state_dict(converted_state, strict=True)
    count = sum(p.numel() for p in net.parameters())
    assert count == expected == sum(v.numel() for v in state.values())
    assert count == sum(p.numel() for p in default_net().parameters())
    assert {k: v.shape for k, v in net.state_dict().items()} == {
        k: v.shape for k, v in default_net().state_dict().items()
    }


@pytest.mark.integration
def test_cli_converts_official_model_file(official_fixture, tmp_path):
    """An official .model (state_dict + training state) -> our checkpoint, via the CLI; no silent overwrite."""
    src = tmp_path / "model_final_checkpoint.model"
    torch.save(
        {"epoch": 1000, "state_dict": official_fixture["upstream_state_dict"], "plot_stuff": ([0.1], [0.2], [0.3], [])},
        src,
    )
    dst = tmp_path / "out" / "model.pt"
    run = subprocess.run(
        [sys.executable, "-m", "uniseg_monai", "convert-official", str(src), str(dst)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert '"kind": "upstream"' in run.stdout
    ckpt = torch.load(dst, weights_only=True)
    from monai.bundle import ConfigParser

    net = ConfigParser({"net": ckpt["network_def"]}).get_parsed_content("net")
    net.load_state_dict(ckpt["model"], strict=True)
    case = official_fixture["upstream_cases"][-1]
    ref = case["outputs"][0]
    out = zyx_to_xyz(net.eval()(zyx_to_xyz(case["input"]), case["task_id"]).detach())
    assert (out - ref).abs().max().item() <= float32_tolerance(ref)

    before = dst.read_bytes()
    again = subprocess.run(
        [sys.executable, "-m", "uniseg_monai", "convert-official", str(src), str(dst)], capture_output=True, text=True
    )
    assert again.returncode == 2 and "--overwrite" in again.stderr and str(dst) in again.stderr
    assert dst.read_bytes() == before
    assert sorted(p.name for p in dst.parent.iterdir()) == ["model.pt"]  # no temporary file left behind


@pytest.mark.integration
@pytest.mark.parametrize(("kind", "name"), [("upstream", "uniseg_pretrain"), ("downstream", "uniseg_finetune_btcv")])
def test_cli_converts_into_a_bundle_with_provenance(official_fixture, tmp_path, kind, name):
    import json

    bundle = tiny_bundle(official_fixture, kind, name, tmp_path)
    src = tmp_path / "official.model"
    torch.save({"state_dict": official_fixture[f"{kind}_state_dict"]}, src)
    run = subprocess.run(
        [sys.executable, "-m", "uniseg_monai", "convert-official", str(src), "--bundle", str(bundle)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    saved = torch.load(bundle / "models" / "model.pt", weights_only=True)
    state = saved["model"]
    assert saved["network_def"] == infer_network_def(official_fixture[f"{kind}_state_dict"])
    assert list(saved["tasks"]) == (list(PAPER_UPSTREAM_TASKS) if kind == "upstream" else ["btcv"])
    assert "non-commercial" in saved["provenance"]["licence"]
    expected = convert_state_dict(official_fixture[f"{kind}_state_dict"])
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    provenance = json.loads((bundle / "models" / "model_provenance.json").read_text())
    assert "non-commercial" in provenance["licence"] and provenance["source"] == str(src.resolve())
    again = subprocess.run(
        [sys.executable, "-m", "uniseg_monai", "convert-official", str(src), "--bundle", str(bundle)],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_converting_into_the_wrong_bundle_is_refused(official_fixture, tmp_path):
    from uniseg_monai.apps.weights import convert_into_bundle
    from uniseg_monai.model_io.model_files import ModelFileError

    bundle = tiny_bundle(official_fixture, "upstream", "uniseg_pretrain", tmp_path)
    src = tmp_path / "downstream.model"
    torch.save({"state_dict": official_fixture["downstream_state_dict"]}, src)
    with pytest.raises(ModelFileError, match="does not fit bundle"):
        convert_into_bundle(src, bundle)
    assert not (bundle / "models" / "model.pt").exists()


class Arbitrary:
    """A class that only full unpickling could rebuild."""


@pytest.mark.integration
def test_checkpoint_needing_unpickling_is_refused(tmp_path):
    src = tmp_path / "evil.model"
    torch.save({"state_dict": {}, "hook": Arbitrary()}, src)
    run = subprocess.run(
        [sys.executable, "-m", "uniseg_monai", "convert-official", str(src), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert "refused" in run.stderr and str(src) in run.stderr
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.integration
def test_non_uniseg_checkpoint_is_a_clear_error(tmp_path):
    src = tmp_path / "other.model"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, src)
    run = subprocess.run(
        [str(Path(sys.executable).with_name("uniseg")), "convert-official", str(src), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "not an official UniSeg checkpoint" in run.stderr


@pytest.mark.parametrize("dst", ["the source", "a symbolic link to it", "a hard link to it", "a folder", "bundle"])
def test_convert_official_never_writes_over_its_source_or_into_a_folder(
    official_fixture, tmp_path, monkeypatch, capsys, dst
):
    """DST that is SRC (by path or through a link) or a folder: one line, exit 2, every file as it was."""
    from uniseg_monai.cli import main

    src = tmp_path / "official.model"
    torch.save({"state_dict": official_fixture["upstream_state_dict"]}, src)
    args = ["convert-official", str(src), str(src), "--overwrite"]
    if dst == "a symbolic link to it":
        (tmp_path / "link.model").symlink_to(src)
        args[2] = str(tmp_path / "link.model")
    elif dst == "a hard link to it":
        (tmp_path / "hard.model").hardlink_to(src)
        args[2] = str(tmp_path / "hard.model")
    elif dst == "a folder":
        (tmp_path / "models").mkdir()
        args[2] = str(tmp_path / "models")
    elif dst == "bundle":  # an official file that is the bundle's models/model.pt, converted into that bundle
        bundle = tiny_bundle(official_fixture, "upstream", "uniseg_pretrain", tmp_path)
        src = bundle / "models" / "model.pt"
        torch.save({"state_dict": official_fixture["upstream_state_dict"]}, src)
        args = ["convert-official", str(src), "--bundle", str(bundle), "--overwrite"]
    before = {p: p.read_bytes() if p.is_file() else None for p in sorted(tmp_path.rglob("*"))}
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(lines) == 1, lines
    folder = "is a folder, but it must be the file to write"
    reason = folder if dst == "a folder" else f"is the source file {src} itself"
    assert reason in lines[0]
    assert {p: p.read_bytes() if p.is_file() else None for p in sorted(tmp_path.rglob("*"))} == before
