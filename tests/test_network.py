"""Behaviour of the UniSeg network beyond official parity: tasks per sample, windows, errors, gradients."""

from __future__ import annotations

import pytest
import torch
from network_outputs import all_heads
from torch import nn

from uniseg_monai.model_io.model_files import network_from_file, save_model
from uniseg_monai.networks import UniSeg, UniSegBackbone, compiled, nnunet_features
from uniseg_monai.tasks import TaskRegistry

TINY = {"features": nnunet_features(8, 32), "patch_size": (64, 64, 16)}


@pytest.fixture
def net() -> UniSeg:
    torch.manual_seed(0)
    return UniSeg(**TINY)


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paper_configuration_parameter_breakdown():
    """Counts of each piece of Fig. 2 as measured on the official implementation (facts file)."""
    net = UniSeg()
    stems = net.encoder[0][0]
    assert [params(stems.convs[c]) for c in ("1", "2", "4")] == [320, 608, 1184]
    assert params(net.encoder) == 8_476_384
    assert params(net.bottleneck) == 5_531_520
    assert net.universal_prompt.numel() + params(net.fuse) == 940_845
    assert params(net.decoder) == 17_162_432
    assert params(net.heads) == 3_200
    assert params(net) == 32_114_381
    assert net.universal_prompt.shape == (1, 11, 6, 6, 4)
    assert net.total_stride == (32, 32, 16)


@pytest.mark.exactness
def test_deep_supervision_in_training_and_full_resolution_in_eval(net):
    x = torch.randn(2, 1, 64, 64, 16)
    outs = net.train()(x, 0)
    assert [tuple(o.shape) for o in outs] == [
        (2, 4, 64, 64, 16),
        (2, 4, 32, 32, 16),
        (2, 4, 16, 16, 8),
        (2, 4, 8, 8, 4),
        (2, 4, 4, 4, 2),
    ]
    with torch.no_grad():
        out = net.eval()(x, 0)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 4, 64, 64, 16)
    assert torch.equal(all_heads(net, x, 0)[0], out) and not net.training  # train-mode heads = eval mode's
    net.deep_supervision = False
    assert isinstance(net.train()(x, 0), torch.Tensor)


@pytest.mark.exactness
def test_every_sample_uses_its_own_task(net):
    net.eval()
    x = torch.randn(3, 1, 64, 64, 16)
    tasks = [0, 5, 10]
    with torch.no_grad():
        mixed = net(x, torch.tensor(tasks))
        separate = torch.cat([net(x[i : i + 1], t) for i, t in enumerate(tasks)])
        same_image_other_task = net(x[:1], 7)
    torch.testing.assert_close(mixed, separate, atol=1e-4, rtol=1e-4)  # float32 batch-size noise
    assert (same_image_other_task - mixed[:1]).abs().max() > 1e-3  # the prompt does change the result


@pytest.mark.exactness
def test_task_id_forms_agree(net):
    net.eval()
    x = torch.randn(2, 1, 64, 64, 16)
    with torch.no_grad():
        ref = net(x, [3, 3])
        for task_id in (3, torch.tensor(3), (3, 3), torch.tensor([3, 3]), torch.tensor([[3], [3]])):
            torch.testing.assert_close(net(x, task_id), ref)


def test_windows_other_than_the_training_patch(net):
    net.eval()
    assert net.prompt_at((2, 2, 1)) is net.universal_prompt  # the training size uses the prompt as learned
    resized = net.prompt_at((3, 5, 2))
    assert resized.shape == (1, 11, 3, 5, 2)
    assert torch.allclose(resized.mean(dim=(2, 3, 4)), net.universal_prompt.mean(dim=(2, 3, 4)), atol=0.5)
    for size in ((96, 160, 32), (64, 32, 16), (64, 64, 48)):
        with torch.no_grad():
            out = net(torch.randn(1, 1, *size), 2)
        assert out.shape == (1, 4, *size) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("shape", "task_id", "message"),
    [
        ((1, 3, 64, 64, 16), 0, "3 channels"),
        ((1, 1, 64, 64, 16), 11, "outside [0, 11)"),
        ((1, 1, 64, 64, 16), -1, "outside [0, 11)"),
        ((1, 1, 60, 64, 16), 0, "not divisible by the total stride"),
        ((1, 1, 64, 64, 8), 0, "not divisible by the total stride"),
        ((1, 1, 32, 32, 16), 0, "at least 2 voxels"),
        ((2, 1, 64, 64, 16), [0, 1, 2], "3 task ids for a batch of 2"),
        ((2, 1, 64, 64, 16), torch.tensor([0.0, 1.0]), "must be integer"),
        ((1, 64, 64, 16), 0, "(B, C, X, Y, Z)"),
    ],
)
def test_clear_errors(net, shape, task_id, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        net(torch.randn(*shape), task_id)


def test_constructor_errors():
    with pytest.raises(ValueError, match="patch_size"):
        UniSeg(**{**TINY, "patch_size": (64, 64, 24)})
    with pytest.raises(ValueError, match="one entry per stage"):
        UniSeg(features=(8, 16), kernel_sizes=(3, 3, 3))
    with pytest.raises(ValueError, match="distinct positive"):
        UniSeg(**TINY, in_channels=(1, 1))


def test_gradients_reach_prompt_fuse_and_only_the_used_stem(net):
    net.train()
    outs = net(torch.randn(2, 2, 64, 64, 16), [10, 4])
    sum(o.square().mean() for o in outs).backward()
    assert net.universal_prompt.grad is not None and net.universal_prompt.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.fuse.parameters())
    stems = net.encoder[0][0].convs
    assert stems["2"].conv.weight.grad.abs().sum() > 0
    assert stems["1"].conv.weight.grad is None and stems["4"].conv.weight.grad is None


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_stem_is_chosen_by_channel_count(net, channels):
    stems = net.encoder[0][0]
    x = torch.randn(1, channels, 64, 64, 16)
    with torch.no_grad():
        expected = stems.adn(stems.convs[str(channels)](x))
        torch.testing.assert_close(stems(x), expected)


def test_initialisation_follows_nnunet(net):
    assert abs(net.universal_prompt.std().item() - 1.0) < 0.2
    conv = net.encoder[2][0].conv
    fan_in = conv.weight[0].numel()
    expected_std = (2.0 / (1 + 0.01**2) / fan_in) ** 0.5
    assert abs(conv.weight.std().item() / expected_std - 1) < 0.05
    assert torch.count_nonzero(conv.bias) == 0


@pytest.mark.parametrize("num_classes", [2, 14])
def test_downstream_backbone(num_classes):
    net = UniSegBackbone(num_classes=num_classes, features=TINY["features"])
    assert not hasattr(net, "universal_prompt") and not hasattr(net, "fuse")
    assert net.decoder[0].upsample.conv.in_channels == 32  # no prompt channel
    outs = net.train()(torch.randn(1, 1, 64, 64, 16))
    assert len(outs) == 5 and outs[0].shape == (1, num_classes, 64, 64, 16)
    assert net.eval()(torch.randn(1, 4, 64, 32, 16)).shape == (1, num_classes, 64, 32, 16)


COMPILE_TINY = {
    "num_tasks": 3,
    "num_classes": 3,
    "features": (4, 8, 16),
    "kernel_sizes": ((3, 3, 1), (3, 3, 3), (3, 3, 3)),
    "strides": ((1, 1, 1), (2, 2, 1), (2, 2, 2)),
    "patch_size": (16, 16, 8),
    "fuse_blocks": 1,
}  # the smallest UniSeg: inductor's compile time grows with the number of ops, not with the tensors


@pytest.mark.exactness
def test_forward_compiles_without_graph_breaks_to_the_eager_outputs_and_plain_weights(tmp_path):
    torch.manual_seed(0)
    net, eager = UniSeg(**COMPILE_TINY), UniSeg(**COMPILE_TINY)
    eager.load_state_dict(net.state_dict())
    x, ids = torch.randn(2, 1, 16, 16, 8), torch.tensor([0, 2])
    for mode in (True, False):  # training (deep supervision) and inference
        explanation = torch._dynamo.explain(net.train(mode))(x, ids)
        assert explanation.graph_break_count == 0, explanation.break_reasons
    assert compiled(net, "true") is net and net._compiled_call_impl is not None  # in place (the bundles' `compile`)
    with torch.no_grad():
        expected = eager.eval()(x, ids)
        torch.testing.assert_close(net.eval()(x, ids), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert list(net.state_dict()) == list(eager.state_dict())  # no `_orig_mod.` prefix
    save_model(tmp_path / "model.pt", net.state_dict(), net.network_def(), TaskRegistry().subset(["liver"]))
    plain, _ = network_from_file(tmp_path / "model.pt")  # a model trained compiled loads into a plain network
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x, ids), expected)
    with pytest.raises(ValueError, match="--compile takes true or false"):
        compiled(eager, "maybe")
    torch._dynamo.reset()
