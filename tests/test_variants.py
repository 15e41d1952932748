"""The paper's ablations (Fixed Prompt, Multiple Prompts, UniSeg-T, FUSE depth, prompt width) and universal baselines
(DoDNet, CLIP-DoDNet, the task-blind backbone): each is tested for what makes it that variant, per-sample tasks in a
batch, TorchScript, and its bundle overlay (``uniseg ablate``: tests/test_ablation.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from uniseg_monai.core.errors import UsageError
from uniseg_monai.model_io.model_files import build_network
from uniseg_monai.networks import CLIPDoDNet, DoDNet, TaskBlindUniSeg, UniSeg

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "uniseg_pretrain"
SMALL = {"num_tasks": 3, "num_classes": 4, "features": (4, 8, 16, 16), "kernel_sizes": [3] * 4, "strides": [1, 2, 2, 2]}
PATCH = {"patch_size": (32, 32, 16)}


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def batch(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 1, 32, 32, 16)


def sgd_step(net: torch.nn.Module, x: torch.Tensor, ids: torch.Tensor) -> None:
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    net.train()
    sum(o.mean() for o in net(x, ids)).backward()
    optimizer.step()


def test_the_paper_configuration_is_the_default():
    net = UniSeg(**SMALL, **PATCH)
    assert not {"prompt", "prompt_channels", "prompt_at"} & set(net.network_def())  # model files stay as before
    assert net.universal_prompt.shape[1] == 3 and len(net.fuse) == 3 and net.decoder[0].upsample.conv.in_channels == 17


def test_fixed_prompt_is_zeros_and_never_learned():
    learned, fixed = UniSeg(**SMALL, **PATCH), UniSeg(**SMALL, **PATCH, prompt="fixed")
    assert "universal_prompt" not in dict(fixed.named_parameters()) and "universal_prompt" in dict(
        fixed.named_buffers()
    )
    before = learned.universal_prompt.detach().clone()
    for net in (learned, fixed):
        sgd_step(net, batch(), torch.tensor([0, 1]))
    assert not torch.equal(learned.universal_prompt.detach(), before)  # the paper's prompt learns
    assert torch.count_nonzero(fixed.universal_prompt) == 0  # the fixed one stays zeros
    assert fixed.network_def()["prompt"] == "fixed"


def test_multiple_prompts_are_one_learned_prompt_per_task_without_fuse():
    net = UniSeg(**SMALL, **PATCH, prompt="multiple").eval()
    assert not any(k.startswith("fuse.") for k in net.state_dict())
    x = batch(1).expand(2, -1, -1, -1, -1)
    before = net(x, torch.tensor([0, 1]))
    with torch.no_grad():
        net.universal_prompt[:, 1] += 1.0  # task 1's own prompt
    after = net(x, torch.tensor([0, 1]))
    assert torch.equal(before[0], after[0]) and not torch.equal(before[1], after[1])  # only task 1 changes
    with pytest.raises(UsageError, match="one prompt per task"):
        UniSeg(**SMALL, **PATCH, prompt="multiple", prompt_channels=6)


def test_uniseg_t_injects_the_task_prompt_at_the_end_of_the_decoder():
    net = UniSeg(**SMALL, **PATCH, prompt_at="end").train()
    assert net.decoder[0].upsample.conv.in_channels == 16  # the bottleneck alone
    assert net.decoder[-1].blocks[0].conv.in_channels == 2 * 4 + 1  # upsampled + skip + the task prompt
    x = batch(1).expand(2, -1, -1, -1, -1)
    logits = net(x, torch.tensor([0, 2]))
    assert all(torch.allclose(o[0], o[1]) for o in logits[1:])  # lower deep-supervision levels do not see the task
    assert not torch.allclose(logits[0][0], logits[0][1])  # the full-resolution output does


@pytest.mark.parametrize("blocks", [1, 2, 3, 4])
@pytest.mark.parametrize("width", [0, 6, 12, 16])  # N, 2N, 4N, C (the bottleneck's 16 channels here)
def test_fuse_depth_and_universal_prompt_width(blocks, width):
    net = UniSeg(**SMALL, **PATCH, fuse_blocks=blocks, prompt_channels=width)
    assert len(net.fuse) == blocks and net.universal_prompt.shape[1] == (width or 3)
    assert net.fuse[0].conv.in_channels == 16 + (width or 3) and net.fuse[-1].conv.out_channels == 3
    assert net(batch(), torch.tensor([0, 2])).__len__() == 3


def test_dodnet_generates_a_head_per_sample_from_its_task():
    net = DoDNet(**SMALL).eval()
    x = batch(1).expand(2, -1, -1, -1, -1)
    _, z = net.encode(x)
    params = net.head_parameters(z, torch.tensor([0, 1]))
    assert params.shape == (2, (8 * 8 + 8) * 2 + 4 * 8 + 4) and not torch.allclose(params[0], params[1])
    both = net(torch.cat([x[:1], x[:1]]), torch.tensor([0, 1]))
    assert torch.allclose(both[0], net(x[:1], 0)[0], atol=1e-5) and torch.allclose(both[1], net(x[:1], 1)[0], atol=1e-5)
    assert not torch.allclose(both[0], both[1])


def test_clip_dodnet_reads_a_fixed_embedding_table(tmp_path):
    table = torch.randn(3, 5)
    torch.save(table, tmp_path / "codes.pt")
    np.save(tmp_path / "codes.npy", table.numpy())
    for name in ("codes.pt", "codes.npy"):
        net = CLIPDoDNet(**SMALL, task_embeddings=str(tmp_path / name))
        assert torch.equal(net.task_codes, table) and "task_codes" not in dict(net.named_parameters())
    assert net.network_def()["task_code_dim"] == 5
    rebuilt = build_network(net.network_def())  # from a model file: the table comes with the weights
    rebuilt.load_state_dict(net.state_dict())
    x = batch(1)
    assert torch.equal(rebuilt.eval()(x, 2), net.eval()(x, 2))
    torch.save(torch.randn(2, 5), tmp_path / "short.pt")
    with pytest.raises(UsageError, match=r"shape \(num_tasks=3, D\).*got shape \(2, 5\)"):
        CLIPDoDNet(**SMALL, task_embeddings=str(tmp_path / "short.pt"))
    with pytest.raises(UsageError, match="--task_embeddings FILE"):
        CLIPDoDNet(**SMALL)


@pytest.mark.exactness
def test_the_task_blind_backbone_ignores_the_task():
    net = TaskBlindUniSeg(**SMALL).eval()
    x = batch(1)
    assert torch.equal(net(x, 0), net(x, 2))


@pytest.mark.parametrize("net", [DoDNet(**SMALL), TaskBlindUniSeg(**SMALL), UniSeg(**SMALL, **PATCH, prompt_at="end")])
@pytest.mark.exactness
def test_all_task_inference_equals_the_per_task_passes(net):
    net.eval()
    x = batch()
    with torch.no_grad():
        together = net.forward_tasks(x, [2, 0])
        assert torch.allclose(together[:, 0], net(x, 2), atol=1e-5) and torch.allclose(
            together[:, 1], net(x, 0), atol=1e-5
        )


@pytest.mark.parametrize(
    "net",
    [
        UniSeg(**SMALL, **PATCH, prompt="fixed"),
        UniSeg(**SMALL, **PATCH, prompt="multiple"),
        UniSeg(**SMALL, **PATCH, prompt_at="end"),
        DoDNet(**SMALL),
        TaskBlindUniSeg(**SMALL),
    ],
    ids=["fixed", "multiple", "uniseg_t", "dodnet", "task_blind"],
)
@pytest.mark.exactness
def test_variants_are_torchscript_compatible_and_rebuild_from_their_network_def(net):
    net.eval()
    x, ids = batch(), torch.tensor([2, 0])
    assert torch.allclose(torch.jit.script(net)(x, ids), net(x, ids), atol=1e-6)
    rebuilt = build_network(net.network_def())
    rebuilt.load_state_dict(net.state_dict())
    assert torch.equal(rebuilt.eval()(x, ids), net(x, ids))


@pytest.mark.parametrize("overlay", sorted(p.stem for p in (BUNDLE / "configs" / "variants").glob("*.json")))
def test_each_variant_overlay_builds_its_network(overlay, phantoms, tmp_path):
    parser = ConfigParser()
    parser.read_config(
        [str(BUNDLE / "configs" / "train.json"), str(BUNDLE / "configs" / "variants" / f"{overlay}.json")]
    )
    table = tmp_path / "codes.pt"
    torch.save(torch.randn(4, 6), table)
    parser.update({"bundle_root": str(BUNDLE), "dataset_dir": str(phantoms.parent), "ckpt_dir": str(tmp_path),
                   "patch_size": [64, 64, 32], "base_features": 4, "task_embeddings": str(table)})  # fmt: skip
    net = parser.get_parsed_content("network_def")
    expected = {"dodnet": DoDNet, "clip_dodnet": CLIPDoDNet, "task_blind": TaskBlindUniSeg}.get(overlay, UniSeg)
    assert type(net) is expected
    variant = json.loads((BUNDLE / "configs" / "variants" / f"{overlay}.json").read_text())
    for key, value in variant.items():
        if key.startswith("network_def#") and not str(value).startswith("$"):
            assert net.network_def()[key.split("#")[1]] == value
    if overlay == "prompt_2n":
        assert net.universal_prompt.shape[1] == 8  # 2 x the 4 phantom tasks
