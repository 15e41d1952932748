"""Task-aware loss, inferers, metric/report and run-folder handlers."""

from __future__ import annotations

import json

import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.losses import DiceCELoss

from uniseg_monai.core.run_folder import check_run_dir, latest_checkpoint, resume_checkpoint
from uniseg_monai.engine.evaluation import EvaluationReport, TaskDice
from uniseg_monai.engine.inferers import (
    MIRROR_AXES,
    AllTaskSlidingWindowInferer,
    MirroringSlidingWindowInferer,
    TaskSlidingWindowInferer,
    TaskTrainingInferer,
)
from uniseg_monai.engine.losses import TaskDeepSupervisionLoss, deep_supervision_weights
from uniseg_monai.networks import TaskLogits, UniSeg, UniSegBackbone
from uniseg_monai.tasks import TaskRegistry

SMALL = {"features": (4, 8, 16, 32, 64, 64), "patch_size": (64, 64, 32)}
TINY_ARCH = {
    "kernel_sizes": [[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
    "strides": [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]],
}


def test_deep_supervision_weights_are_the_papers():
    assert deep_supervision_weights(5) == pytest.approx([0.5333, 0.2667, 0.1333, 0.0667, 0.0], abs=1e-4)


def _pred(classes=4, batch=2):
    sizes = [(16, 16, 8), (8, 8, 4), (4, 4, 2)]
    return [torch.randn(batch, classes, *s, requires_grad=True) for s in sizes]


def test_loss_uses_only_the_task_classes():
    torch.manual_seed(0)
    loss = TaskDeepSupervisionLoss(classes_per_task=[2, 4], weights=[0.5, 0.5, 0.0])
    logits = _pred()
    target = torch.randint(0, 2, (2, 1, 16, 16, 8)).float()
    value = loss(TaskLogits(logits, torch.tensor([0, 0])), target)
    value.backward()
    for p in logits[:2]:
        assert p.grad[:, 2:].abs().max() == 0 < p.grad[:, :2].abs().max()  # channels 2-3 do not exist for 2 classes
    assert logits[2].grad is None  # the zero-weight level is not computed at all

    dice_ce = DiceCELoss(
        include_background=False, to_onehot_y=True, softmax=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5
    )
    small = torch.nn.functional.interpolate(target, size=(8, 8, 4), mode="nearest-exact")
    expected = 0.5 * dice_ce(logits[0][:, :2], target) + 0.5 * dice_ce(logits[1][:, :2], small)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


def test_loss_splits_mixed_batches_by_task_and_checks_labels():
    torch.manual_seed(0)
    loss = TaskDeepSupervisionLoss(classes_per_task=[2, 4], weights=[1.0])
    logits = torch.randn(2, 4, 8, 8, 8)
    target = torch.stack([torch.randint(0, 2, (1, 8, 8, 8)), torch.randint(0, 4, (1, 8, 8, 8))]).float()
    dice_ce = DiceCELoss(
        include_background=False, to_onehot_y=True, softmax=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5
    )
    expected = 0.5 * dice_ce(logits[:1, :2], target[:1]) + 0.5 * dice_ce(logits[1:], target[1:])
    assert loss(TaskLogits(logits, torch.tensor([0, 1])), target).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="task 0 has 2 classes"):
        loss(TaskLogits(logits, torch.tensor([0, 0])), target)
    with pytest.raises(TypeError, match="TaskTrainingInferer"):
        loss([logits], target)


def test_training_inferer_passes_the_task_and_tags_the_output():
    net = UniSeg(num_tasks=3, num_classes=3, **SMALL).train()
    x = torch.randn(2, 1, 64, 64, 32)
    out = TaskTrainingInferer()(x, net, task_id=torch.tensor([2, 0]))
    assert isinstance(out, TaskLogits) and out.task_id.tolist() == [2, 0] and len(out) == 5
    torch.testing.assert_close(out[0], net(x, torch.tensor([2, 0]))[0])


@pytest.mark.exactness
def test_sliding_window_inferer_restricts_classes_mirrors_and_takes_a_default_task():
    torch.manual_seed(0)
    net = UniSeg(num_tasks=3, num_classes=4, **SMALL).eval()
    x = torch.randn(1, 1, 64, 64, 32)
    inferer = TaskSlidingWindowInferer((64, 64, 32), classes_per_task=[2, 4, 3])
    with torch.no_grad():
        out = inferer(x, net, task_id=torch.tensor([0]))
        torch.testing.assert_close(out, net(x, 0)[:, :2], atol=1e-5, rtol=1e-5)  # one window: the network itself
        assert inferer(x, net, task_id=1).shape[1] == 4
        with pytest.raises(ValueError, match="no task given"):
            inferer(x, net)
        inferer.task_id = 2  # MONAI Label calls inferer(inputs, network)
        assert inferer(x, net).shape[1] == 3
        inferer.tta = True
        mirrored = sum(torch.flip(net(torch.flip(x, a), 2), a) if a else net(x, 2) for a in MIRROR_AXES) / 8
        torch.testing.assert_close(inferer(x, net), mirrored[:, :3], atol=1e-5, rtol=1e-5)
        mixed = TaskSlidingWindowInferer((64, 64, 32), [2, 4, 3])(x.expand(2, -1, -1, -1, -1), net, [0, 1])
        assert mixed.shape[1] == 4 and torch.softmax(mixed, 1)[0, 2:].max() == 0  # absent classes get softmax 0


@pytest.mark.exactness
def test_all_task_inference_equals_the_per_task_passes():
    torch.manual_seed(0)
    net = UniSeg(num_tasks=4, num_classes=4, features=(4, 8, 16, 32), patch_size=(32, 32, 16), **TINY_ARCH).eval()
    x = torch.randn(2, 1, 48, 32, 24)  # overlapping windows along x and z
    classes = [2, 4, 3, 2]
    with torch.no_grad():
        per_window = net.forward_tasks(x[..., :32, :, :16], [3, 0, 2])
        for i, t in enumerate([3, 0, 2]):
            torch.testing.assert_close(per_window[:, i], net(x[..., :32, :, :16], t), atol=1e-5, rtol=1e-5)
        for tta in (False, True):
            all_tasks = AllTaskSlidingWindowInferer((32, 32, 16), classes, tta=tta)(x, net, [0, 1, 2, 3])
            single = TaskSlidingWindowInferer((32, 32, 16), classes, tta=tta)
            for t in range(4):
                reference = single(x, net, task_id=t)
                assert all_tasks[t].shape == reference.shape == (2, classes[t], 48, 32, 24)
                torch.testing.assert_close(all_tasks[t], reference, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(all_tasks[0], all_tasks[3])  # the tasks really differ
    with pytest.raises(ValueError, match="outside"):
        net.forward_tasks(x[..., :32, :, :16], [4])


@pytest.mark.exactness
def test_mirroring_inferer_serves_task_free_networks():
    torch.manual_seed(0)
    net = UniSegBackbone(num_classes=3, features=SMALL["features"]).eval()
    x = torch.randn(1, 1, 64, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(MirroringSlidingWindowInferer((64, 64, 32))(x, net), net(x), atol=1e-5, rtol=1e-5)
        mirrored = sum(torch.flip(net(torch.flip(x, a)), a) if a else net(x) for a in MIRROR_AXES) / 8
        tta = MirroringSlidingWindowInferer((64, 64, 32), tta=True)(x, net)
        torch.testing.assert_close(tta, mirrored, atol=1e-5, rtol=1e-5)


def _evaluated(registry, cases):
    """Run TaskDice on (task, prediction, label) cases through a bare ignite engine."""
    metric = TaskDice(registry, hd95=True)

    def step(engine, batch):
        task, pred, label, name = batch
        engine.state.batch = [
            {
                "task_id": registry[task].id,
                "image": MetaTensor(torch.zeros(1), meta={"filename_or_obj": f"/x/{name}.nii.gz"}),
            }
        ]
        return [{"pred": pred, "label": label}]

    engine = Engine(step)
    metric.attach(engine, "dice")
    engine.run(cases, max_epochs=1)
    return metric, engine


def test_task_dice_and_report(tmp_path):
    registry = TaskRegistry().subset(["liver", "spleen"])
    label = torch.zeros(1, 8, 8, 8)
    label[0, 2:6, 2:6, 2:6] = 1
    label[0, 3:4, 3:4, 3:4] = 2
    half = label.clone()
    half[0, 2:4] = 0
    cases = [
        ("liver", label.clone(), label.clone(), "a"),
        ("spleen", (label > 0).float(), (label > 0).float(), "b"),
        ("spleen", (half > 0).float(), (label > 0).float(), "c"),
    ]
    metric, engine = _evaluated(registry, cases)
    spleen_c = 2 * 32 / (32 + 64)
    assert engine.state.metrics["dice/liver"] == pytest.approx(1.0)
    assert engine.state.metrics["dice/spleen"] == pytest.approx((1 + spleen_c) / 2)
    assert engine.state.metrics["dice"] == pytest.approx((1 + (1 + spleen_c) / 2) / 2)

    EvaluationReport(metric, tmp_path, log=None)(engine)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mean_dice"] == pytest.approx(engine.state.metrics["dice"])
    assert summary["tasks"]["liver"]["per_class"] == {"liver": pytest.approx(1.0), "liver tumour": pytest.approx(1.0)}
    assert summary["hd95"]["liver"]["hd95"] == pytest.approx(0.0)
    rows = (tmp_path / "per_case.csv").read_text().splitlines()
    assert rows[0] == "case,task,class,dice,hd95_mm,nsd,group" and len(rows) == 1 + 2 + 1 + 1
    md = (tmp_path / "summary.md").read_text().splitlines()
    assert md[0] == "| metric | liver | spleen | mean |" and md[2].startswith("| Dice (%) | 100.00 |")


def test_per_class_report_has_the_table3_columns(tmp_path):
    registry = TaskRegistry().subset(["btcv"])
    label = torch.zeros(1, 14, 4, 4)
    for k in range(14):
        label[0, k] = k
    pred = label.clone()
    pred[0, 1] = 0  # spleen missed entirely
    metric, engine = _evaluated(registry, [("btcv", pred, label, "img0001")])
    EvaluationReport(metric, tmp_path, log=None)(engine)
    md = (tmp_path / "per_class.md").read_text().splitlines()
    assert md[0] == "**btcv**"
    assert md[2] == "| metric | Sp | RKi | LKi | Gb | Es | Li | St | Ao | IVC | PSV | Pa | RAG | LAG | Mean |"
    assert md[4] == "| Dice (%) | 0.00 | " + "100.00 | " * 12 + f"{1200 / 13:.2f} |"
    rows = (tmp_path / "per_class.csv").read_text().splitlines()
    assert rows[0].startswith("btcv,metric,Sp,RKi") and rows[1].startswith("btcv,Dice (%),0.00,100.00")


def test_run_folder_is_never_overwritten_and_resume_finds_the_latest(tmp_path):
    assert check_run_dir(tmp_path / "new", resume=False)
    (tmp_path / "checkpoint_epoch=2.pt").write_bytes(b"2")
    (tmp_path / "checkpoint_epoch=10.pt").write_bytes(b"10")
    with pytest.raises(FileExistsError, match="--resume true"):
        check_run_dir(tmp_path, resume=False)
    assert check_run_dir(tmp_path, resume=True)
    assert latest_checkpoint(tmp_path).name == "checkpoint_epoch=10.pt"
    with pytest.raises(FileNotFoundError, match="no checkpoint_epoch"):
        resume_checkpoint(tmp_path / "new")
