"""UniSeg's training loss: Dice + CE on each sample's own task classes, with deep supervision."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.data import MetaTensor
from monai.losses import DeepSupervisionLoss, DiceCELoss
from torch import nn

from uniseg_monai.networks.task_ids import TaskLogits, as_task_ids


def deep_supervision_weights(levels: int = 5) -> list[float]:
    """nnU-Net's weights: 1/2^i, the lowest resolution set to 0, normalised (5 levels: .533 .267 .133 .067 0)."""
    raw = [0.5**i for i in range(levels)]
    if levels > 1:
        raw[-1] = 0.0
    return [w / sum(raw) for w in raw]


class TaskDeepSupervisionLoss(nn.Module):
    """Per deep-supervision output, the logits sliced to the sample's C_t task channels, then soft Dice (batch
    Dice, no background, smooth 1e-5) + cross-entropy; outputs weighted by ``weights``, targets downsampled by
    nearest neighbour. A batch mixing tasks is split by task and weighted by the share of samples.

    Args:
        classes_per_task: C_t (incl. background) indexed by task id.
        weights: one per output, highest resolution first (default :func:`deep_supervision_weights`).

    ``forward(pred, target)``: pred a :class:`~uniseg_monai.networks.TaskLogits` (or one (B, C, X, Y, Z) tensor
    inside it) with task ids in [0, len(classes_per_task)), target (B, 1, X, Y, Z) with label values in [0, C_t).
    """

    def __init__(self, classes_per_task: Sequence[int], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.classes_per_task = [int(c) for c in classes_per_task]
        self.weights = list(weights) if weights is not None else None
        dice_ce = DiceCELoss(
            include_background=False, to_onehot_y=True, softmax=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5
        )
        self.loss = DeepSupervisionLoss(dice_ce, weights=[1.0])  # weights applied here, zero levels skipped

    def forward(self, pred: TaskLogits, target: torch.Tensor) -> torch.Tensor:
        if not isinstance(pred, TaskLogits):
            raise TypeError(
                "TaskDeepSupervisionLoss needs the task of every sample: use "
                "uniseg_monai.engine.inferers.TaskTrainingInferer as the trainer's inferer"
            )
        weights = self.weights or deep_supervision_weights(len(pred))
        if len(weights) != len(pred):
            raise ValueError(f"{len(weights)} deep-supervision weights for {len(pred)} network outputs")
        levels = [(w, p) for w, p in zip(weights, pred) if w != 0]
        if isinstance(target, MetaTensor):
            target = target.as_tensor()  # meta data is not needed here and slows every op
        task_ids = as_task_ids(pred.task_id, target.shape[0], len(self.classes_per_task), target.device, "loss")
        total = target.new_zeros((), dtype=torch.float32)
        for task in task_ids.unique().tolist():
            rows = torch.nonzero(task_ids == task).flatten()
            classes = self.classes_per_task[task]
            tgt = target[rows]
            if tgt.numel() and (int(tgt.max()) >= classes or int(tgt.min()) < 0):
                raise ValueError(
                    f"task {task} has {classes} classes but its label holds values {tgt.unique().tolist()}; "
                    "check the task's labels / label_map (uniseg check-data)"
                )
            share = len(rows) / len(task_ids)
            for w, p in levels:
                total = total + share * w * self.loss.get_loss(p[rows, :classes].float(), tgt)
        return total
