"""Transfer of pretrained weights into the downstream backbone (uniseg_monai.model_io.transfer)."""

from __future__ import annotations

import logging

import pytest
import torch
from monai.bundle import ConfigParser

from uniseg_monai.model_io.model_files import build_network
from uniseg_monai.model_io.official import convert_state_dict, infer_network_def, official_key
from uniseg_monai.model_io.transfer import (
    PretrainedCheckpointError,
    load_pretrained,
    pretrained_network,
    transfer_state,
)
from uniseg_monai.networks import UniSeg, UniSegBackbone

SMALL = {"features": (8, 16, 32, 32, 32, 32)}
FIRST_UPSAMPLE = "decoder.0.upsample.conv.weight"  # UniSegBackbone.prompt_widened_key


def snapshot(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def heads(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("heads.")}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def small_uniseg(**kwargs) -> UniSeg:
    return UniSeg(num_tasks=3, num_classes=3, patch_size=(64, 64, 32), **{**SMALL, **kwargs})


@pytest.mark.parametrize("source", ["state dict", "converted checkpoint", "official .model"])
def test_transfer_reproduces_official_downstream(official_fixture, tmp_path, source):
    upstream = official_fixture["upstream_state_dict"]
    downstream = convert_state_dict(official_fixture["downstream_state_dict"])
    torch.manual_seed(0)
    net = build_network(infer_network_def(official_fixture["downstream_state_dict"]))
    assert isinstance(net, UniSegBackbone) and net.num_classes == 14
    init = snapshot(net)

    if source == "state dict":
        report = transfer_state(net, convert_state_dict(upstream))
    else:
        path = tmp_path / ("model.pt" if source == "converted checkpoint" else "model_final_checkpoint.model")
        obj = (
            {"model": convert_state_dict(upstream), "network_def": infer_network_def(upstream)}
            if source == "converted checkpoint"
            else {"epoch": 1000, "state_dict": upstream, "optimizer_state_dict": {}}
        )
        torch.save(obj, path)
        report = load_pretrained(net, path)
        assert report.source == str(path)

    state = net.state_dict()
    assert_same(
        {k: v for k, v in state.items() if not k.startswith("heads.")},
        {k: v for k, v in downstream.items() if not k.startswith("heads.")},
    )
    assert set(report.loaded) == {official_key(k) for k in official_fixture["downstream_loaded_from_upstream"]}
    assert len(report.loaded) == 97
    assert list(report.adapted) == [FIRST_UPSAMPLE]
    assert_same(heads(state), heads(init))  # the downstream network's own fresh heads
    assert sorted(report.initialised) == sorted(heads(init))
    assert all(state[k].shape[0] == 14 for k in report.initialised)
    assert set(report.skipped) == {k for k in convert_state_dict(upstream) if k.startswith(("heads.", "fuse."))} | {
        "universal_prompt"
    }
    assert all(p.requires_grad for p in net.parameters())  # nothing frozen


def test_pretrain_bundle_checkpoint(tmp_path):
    torch.manual_seed(1)
    up = small_uniseg()
    optimizer = torch.optim.SGD(up.parameters(), lr=0.01, momentum=0.99)
    path = tmp_path / "models" / "model.pt"
    path.parent.mkdir()
    torch.save({"model": up.state_dict(), "optimizer": optimizer.state_dict(), "trainer": {"epoch": 3}}, path)
    net = UniSegBackbone(num_classes=2, **SMALL)
    init = snapshot(net)

    report = load_pretrained(net, path)

    source = up.state_dict()
    for key, value in net.state_dict().items():
        if key.startswith("heads."):
            assert torch.equal(value, init[key])
        elif key == FIRST_UPSAMPLE:
            assert source[key].shape == (33, 32, 2, 2, 2)  # (in = bottleneck + prompt, out, x, y, z)
            assert torch.equal(value, source[key][:32])
            assert not torch.equal(value, source[key][1:])
        else:
            assert torch.equal(value, source[key]), key
    assert len(report.loaded) == len(init) - 5
    assert report.skipped["universal_prompt"] == "universal prompt / FUSE: none downstream"
    net.eval()(torch.randn(1, 2, 64, 64, 32))  # the transferred network runs


def test_backbone_source_keeps_fresh_heads_even_for_the_same_classes(tmp_path):
    torch.manual_seed(2)
    source = UniSegBackbone(num_classes=14, **SMALL).state_dict()
    path = tmp_path / "backbone.pt"
    torch.save(source, path)  # a bare state dict
    net = UniSegBackbone(num_classes=14, **SMALL)
    init = snapshot(net)

    report = load_pretrained(net, path)

    assert not report.adapted
    state = net.state_dict()
    assert_same(heads(state), heads(init))
    assert not any(torch.equal(state[k], source[k]) for k in heads(init))
    assert_same({k: state[k] for k in report.loaded}, {k: v for k, v in source.items() if not k.startswith("heads.")})
    assert set(report.skipped) == set(heads(source))


def test_checkpoint_of_another_width_fails_loudly_and_changes_nothing(tmp_path):
    path = tmp_path / "narrow.pt"
    torch.save({"model": small_uniseg(features=(4, 8, 16, 16, 16, 16)).state_dict()}, path)
    net = UniSegBackbone(num_classes=14, **SMALL)
    before = snapshot(net)
    with pytest.raises(PretrainedCheckpointError) as err:
        load_pretrained(net, path)
    message = str(err.value)
    assert str(path) in message and "encoder.0.0.convs.1.conv.weight" in message
    assert "(4, 1, 3, 3, 1)" in message and "(8, 1, 3, 3, 1)" in message
    assert_same(net.state_dict(), before)


def test_missing_encoder_tensor_fails_loudly(tmp_path):
    state = small_uniseg().state_dict()
    del state["encoder.2.0.conv.weight"]
    path = tmp_path / "partial.pt"
    torch.save({"model": state}, path)
    net = UniSegBackbone(num_classes=2, **SMALL)
    before = snapshot(net)
    with pytest.raises(PretrainedCheckpointError, match=r"encoder\.2\.0\.conv\.weight .* missing") as err:
        load_pretrained(net, path)
    assert str(path) in str(err.value)
    assert_same(net.state_dict(), before)


class Arbitrary:
    """A class that only full unpickling could rebuild."""


def test_checkpoint_needing_unpickling_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": small_uniseg().state_dict(), "hook": Arbitrary()}, path)
    with pytest.raises(PretrainedCheckpointError, match="refused") as err:
        load_pretrained(UniSegBackbone(num_classes=2, **SMALL), path)
    assert str(path) in str(err.value)


def test_file_without_a_state_dict_is_a_clear_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"epoch": 3}, path)
    with pytest.raises(PretrainedCheckpointError, match="expected a state dict"):
        load_pretrained(UniSegBackbone(num_classes=2, **SMALL), path)


@pytest.mark.parametrize("path", ["", None])
def test_empty_path_trains_from_scratch(path, caplog):
    net = UniSegBackbone(num_classes=2, **SMALL)
    before = snapshot(net)
    with caplog.at_level(logging.INFO, logger="uniseg_monai.model_io.transfer"):
        assert pretrained_network(net, path) is net
    assert_same(net.state_dict(), before)
    assert "from scratch" in caplog.text


def test_bundle_config_expression_loads_and_logs(tmp_path, caplog):
    up = small_uniseg()
    path = tmp_path / "model.pt"
    torch.save({"model": up.state_dict()}, path)
    parser = ConfigParser(
        {
            "imports": ["$import uniseg_monai", "$import uniseg_monai.model_io.transfer"],
            "pretrained": str(path),
            "network_def": {"_target_": "uniseg_monai.networks.UniSegBackbone", "num_classes": 2, **SMALL},
            "network": "$uniseg_monai.model_io.transfer.pretrained_network(@network_def, @pretrained)",
        }
    )
    parser.get_parsed_content("imports")
    with caplog.at_level(logging.INFO, logger="uniseg_monai.model_io.transfer"):
        net = parser.get_parsed_content("network")
    assert torch.equal(net.state_dict()["bottleneck.1.conv.weight"], up.state_dict()["bottleneck.1.conv.weight"])
    assert f"{path}: loaded {len(net.state_dict()) - 5} tensors" in caplog.text
    assert "heads.0.conv.weight" in caplog.text
