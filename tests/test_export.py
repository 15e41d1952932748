"""ONNX export: ONNX Runtime reproduces PyTorch for tasks, windows and modality stems; files are written safely."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from uniseg_monai.apps.export import OnnxCheckError, export_bundle_onnx, export_onnx, run_onnx
from uniseg_monai.cli import main
from uniseg_monai.core.errors import UsageError
from uniseg_monai.model_io.model_files import save_model
from uniseg_monai.networks import UniSeg, UniSegBackbone
from uniseg_monai.tasks import TaskRegistry, save_model_tasks

ARCH = {
    "features": [4, 8, 16, 32],
    "kernel_sizes": [[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
    "strides": [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]],
}
PATCH = [32, 32, 16]  # total stride (8, 8, 4)
PRETRAIN = Path(__file__).resolve().parents[1] / "bundles" / "uniseg_pretrain"


def tiny_uniseg(seed: int = 0, num_tasks: int = 4, num_classes: int = 3) -> UniSeg:
    torch.manual_seed(seed)
    return UniSeg(num_tasks=num_tasks, num_classes=num_classes, patch_size=PATCH, **ARCH)


def reference(network: torch.nn.Module, *inputs: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return network.eval()(*inputs).numpy()


def input_dims(path) -> dict[str, list]:
    model = onnx.load(str(path))
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    net = tiny_uniseg().train()
    path = tmp_path_factory.mktemp("onnx") / "uniseg.onnx"
    result = export_onnx(net, path, in_channels=1)  # window: the patch size
    return net, path, result


def test_export_result_and_network_untouched(exported):
    net, path, result = exported
    assert result["path"] == str(path) and path.is_file()
    assert result["input_names"] == ["image", "task_id"] and result["output_names"] == ["logits"]
    assert result["window"] == PATCH and result["opset"] == 17 and result["max_abs_diff"] <= 1e-4
    assert input_dims(path) == {"image": ["batch", 1, "x", "y", "z"], "task_id": ["batch"]}
    assert net.training  # the export works on a copy: mode and methods of the caller's network are unchanged
    assert "prompt_at" not in vars(net) and "task_ids" not in vars(net)
    names = {i.name for i in onnx.load(str(path)).graph.initializer}
    assert "encoder.0.0.convs.1.conv.weight" in names and "encoder.0.0.convs.2.conv.weight" not in names


@pytest.mark.parametrize("window", [PATCH, [16, 24, 24]], ids=["patch", "other"])
@pytest.mark.exactness
def test_onnx_matches_pytorch_per_task(exported, window):
    """At the export window and at another admissible one (dynamic axes + resampled prompt), for two tasks."""
    net, path, _ = exported
    image = torch.randn(1, 1, *window).expand(2, -1, -1, -1, -1).contiguous()  # same image, two tasks
    task_id = torch.tensor([0, 3])
    actual = run_onnx(path, image, task_id)
    expected = reference(net, image, task_id)
    assert actual.shape == (2, 3, *window)
    assert np.abs(actual - expected).max() <= 1e-4
    assert np.abs(actual[0] - actual[1]).max() > 1e-2  # the task input reaches the graph, not a traced constant
    single = run_onnx(path, image[:1], task_id[1:])  # dynamic batch
    assert np.abs(single[0] - expected[1]).max() <= 1e-4


def test_backbone_exports_without_task_input(tmp_path):
    torch.manual_seed(1)
    net = UniSegBackbone(num_classes=2, **ARCH)
    result = export_onnx(net, tmp_path / "backbone.onnx", in_channels=2, window=PATCH)
    assert result["input_names"] == ["image"]
    assert input_dims(tmp_path / "backbone.onnx") == {"image": ["batch", 2, "x", "y", "z"]}
    image = torch.randn(1, 2, 24, 16, 8)
    assert np.abs(run_onnx(tmp_path / "backbone.onnx", image) - reference(net, image)).max() <= 1e-4


def test_fixed_size_export(tmp_path):
    export_onnx(tiny_uniseg(), tmp_path / "fixed.onnx", window=[16, 16, 8], dynamic_spatial=False)
    assert input_dims(tmp_path / "fixed.onnx")["image"] == ["batch", 1, 16, 16, 8]


def test_existing_file_refused_and_no_temp_files(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"keep")
    net = tiny_uniseg()
    with pytest.raises(FileExistsError, match="overwrite"):
        export_onnx(net, target, check=False)
    assert target.read_bytes() == b"keep"
    with pytest.raises(OnnxCheckError):  # a failed check publishes nothing
        export_onnx(net, target, overwrite=True, rtol=-1.0)
    assert target.read_bytes() == b"keep"
    result = export_onnx(net, target, overwrite=True)
    assert result["max_abs_diff"] <= 1e-4 and onnx.load(str(target)).graph.input
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_bad_window_refused(tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        export_onnx(tiny_uniseg(), tmp_path / "bad.onnx", window=[32, 32, 10])
    assert not list(tmp_path.iterdir())


def test_export_bundle_onnx(tmp_path):
    registry = TaskRegistry().subset(["liver", "kidney", "prostate"])
    ckpt_dir = tmp_path / "models"
    save_model_tasks(registry, ckpt_dir)
    net = tiny_uniseg(seed=2, num_tasks=registry.num_tasks, num_classes=registry.num_classes)
    torch.save({"model": net.state_dict(), "epoch": 3}, ckpt_dir / "checkpoint_epoch=3.pt")
    out = tmp_path / "export" / "uniseg.onnx"
    result = export_bundle_onnx(PRETRAIN, out, ckpt=ckpt_dir / "checkpoint_epoch=3.pt", patch_size=PATCH, **ARCH)
    assert result["window"] == PATCH and result["path"] == str(out) and result["max_abs_diff"] <= 1e-4
    image, task_id = torch.randn(2, 1, 16, 16, 8), torch.tensor([0, 8])
    # equal to the saved network: the checkpoint's weights were loaded, not a fresh initialisation
    assert np.abs(run_onnx(out, image, task_id) - reference(net, image, task_id)).max() <= 1e-4
    with pytest.raises(FileExistsError):
        export_bundle_onnx(PRETRAIN, out, ckpt=ckpt_dir / "checkpoint_epoch=3.pt", **ARCH)
    (tmp_path / "link.onnx").symlink_to(ckpt_dir / "checkpoint_epoch=3.pt")
    for dst in (ckpt_dir / "checkpoint_epoch=3.pt", tmp_path / "link.onnx"):  # the model itself, or a link to it
        before = (ckpt_dir / "checkpoint_epoch=3.pt").read_bytes()
        with pytest.raises(UsageError, match=r"--onnx .* is the source file .*checkpoint_epoch=3.pt itself"):
            export_bundle_onnx(PRETRAIN, dst, ckpt=ckpt_dir / "checkpoint_epoch=3.pt", overwrite=True, **ARCH)
        assert (ckpt_dir / "checkpoint_epoch=3.pt").read_bytes() == before


@pytest.mark.parametrize(
    ("channels", "expected"), [("3", "modality stems for [1, 2, 4] channels only"), ("x", "got 'x'")]
)
def test_cli_export_with_a_channel_count_without_stem_is_one_line(tmp_path, monkeypatch, capsys, channels, expected):
    registry = TaskRegistry().subset(["liver", "kidney"])
    net = tiny_uniseg(num_tasks=registry.num_tasks, num_classes=registry.num_classes)
    save_model(tmp_path / "model.pt", net.state_dict(), net.network_def(), registry)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(["export", "--bundle", str(PRETRAIN), "--checkpoint", "model.pt", "--onnx", "x.onnx"]
             + ["--in_channels", channels])  # fmt: skip
    lines = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(lines) == 1 and expected in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_the_onnx_check_is_relative_to_the_output_scale(tmp_path, monkeypatch):
    """float32 sums over large windows differ by more than a fixed 1e-4 when logits are large (a fine-tuned model
    at [192, 192, 48]): the check compares with the output scale, as the official parity test; a real mismatch is
    one user-error line (OnnxCheckError is a UniSegError), nothing written."""
    from uniseg_monai.apps import export
    from uniseg_monai.core.errors import UniSegError

    run = export.run_onnx
    scale = {"noise": 1e-6}

    def noisy(model, *inputs):
        out = run(model, *inputs)
        return out + scale["noise"] * max(1.0, float(abs(out).max())) * 50

    monkeypatch.setattr(export, "run_onnx", noisy)
    net = tiny_uniseg()
    with torch.no_grad():
        for head in net.heads:
            head.conv.weight.mul_(1e3)  # logits in the hundreds
    assert export_onnx(net, tmp_path / "ok.onnx")["max_abs_diff"] > 1e-4  # was refused with a fixed 1e-4
    scale["noise"] = 1e-5
    with pytest.raises(UniSegError, match=r"ONNX Runtime differs from PyTorch by .* of the output scale"):
        export_onnx(net, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_the_readme_torchscript_recipe_exports_a_self_describing_file(official_fixture, tmp_path):
    """README's ckpt_export recipe for a model file: the network its network_def describes (here an official
    release converted), not the bundle's default network_def (a 154-line size-mismatch dump before)."""
    from monai.bundle import ckpt_export
    from nnunet_v1 import nnunet_v1_container, save_nnunet_v1

    from uniseg_monai.model_io.model_files import convert_official, network_from_file

    src = save_nnunet_v1(nnunet_v1_container(official_fixture["upstream_state_dict"]), tmp_path / "up.model")
    convert_official(src, tmp_path / "up.pt")
    bundle = Path(__file__).resolve().parents[1] / "bundles" / "uniseg_pretrain"
    ckpt_export(
        net_id="network_def",
        filepath=str(tmp_path / "model.ts"),
        ckpt_file=str(tmp_path / "up.pt"),
        key_in_ckpt="model",
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "inference.json"),
        bundle_root=str(bundle),
        network_def=f"$uniseg_monai.model_io.model_files.network_from_file('{tmp_path / 'up.pt'}')[0]",
    )
    net = network_from_file(tmp_path / "up.pt")[0].eval()
    x = torch.randn(1, 1, *net.network_def()["patch_size"])
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(tmp_path / "model.ts"))(x, torch.tensor([3])), net(x, 3))


@pytest.mark.parametrize(
    ("swap", "expected"),
    [
        ("--onnx", "--onnx {tmp}/out is a folder, but it must be the file to write: give a file name, e.g. "
                   "{tmp}/out/model.onnx"),
        ("--checkpoint", "--checkpoint {tmp}/out is a folder, but it must be a model file: give the one in it, e.g. "
                         "{tmp}/out/model.pt (a bundle folder goes to --bundle)"),
        ("--bundle", "bundle {tmp}/model.pt is a file, but a bundle is a folder with configs/inference.json: give the "
                     "bundle folder or name (a model file goes to --checkpoint)"),
    ],
)  # fmt: skip
def test_cli_export_given_a_folder_for_a_file_or_a_file_for_a_folder_says_given_expected_fix(
    tmp_path, monkeypatch, capsys, swap, expected
):
    """A folder where a file belongs (--onnx, --checkpoint) or a file where a folder does (--bundle): one line, in
    the order what was given, what is expected, the fix (an existing --onnx folder was "exists; pass --overwrite",
    then with --overwrite "is a folder"); nothing written."""
    registry = TaskRegistry().subset(["liver", "kidney"])
    net = tiny_uniseg(num_tasks=registry.num_tasks, num_classes=registry.num_classes)
    save_model(tmp_path / "model.pt", net.state_dict(), net.network_def(), registry)
    (tmp_path / "out").mkdir()
    given = {"--bundle": str(PRETRAIN), "--checkpoint": str(tmp_path / "model.pt"), "--onnx": str(tmp_path / "x.onnx")}
    given[swap] = str(tmp_path / ("model.pt" if swap == "--bundle" else "out"))
    with pytest.raises(SystemExit) as done:
        main(["export", *(x for kv in given.items() for x in kv)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and lines == [f"uniseg: error: {expected.format(tmp=tmp_path)}"], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "out"] and not any((tmp_path / "out").iterdir())
