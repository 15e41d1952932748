"""The universal baselines of the paper's Table 2 on UniSeg's encoder-decoder: DoDNet (and CLIP-DoDNet) and the
task-blind backbone (one network for all tasks that is never told the task).

Both take ``forward(x, task_id)`` like :class:`~uniseg_monai.networks.UniSeg`, so the same bundles, inferers and
loss drive them (``configs/variants/*.json``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from uniseg_monai.core.errors import UsageError
from uniseg_monai.networks.task_ids import TaskId, as_task_ids
from uniseg_monai.networks.uniseg import (
    PAPER_FEATURES,
    PAPER_IN_CHANNELS,
    PAPER_KERNEL_SIZES,
    PAPER_STRIDES,
    UniSegBackbone,
)

HEAD_CHANNELS = 8  # DoDNet's dynamic head: 1x1x1 convs 8 -> 8 -> 8 -> classes


class TaskBlindUniSeg(UniSegBackbone):
    """The backbone trained on all tasks at once without being told the task: ``forward(x, task_id)`` ignores
    ``task_id`` (it is accepted so the bundles' inferers and loss work unchanged). Heads: max classes over tasks;
    where two tasks give one label value different meanings, this network cannot serve both."""

    def __init__(
        self,
        num_tasks: int = 11,
        num_classes: int = 4,
        in_channels: Sequence[int] = PAPER_IN_CHANNELS,
        features: Sequence[int] = PAPER_FEATURES,
        kernel_sizes: Sequence[Sequence[int] | int] = PAPER_KERNEL_SIZES,
        strides: Sequence[Sequence[int] | int] = PAPER_STRIDES,
        deep_supervision: bool = True,
    ) -> None:
        super().__init__(num_classes, in_channels, features, kernel_sizes, strides, deep_supervision)
        self.num_tasks = num_tasks
        self.init_args = {"num_tasks": int(num_tasks), **self.init_args}

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, task_id: torch.Tensor
    ) -> Union[torch.Tensor, list[torch.Tensor]]:  # noqa: UP007
        skips, z = self.encode(x)
        return self.output(self.decode(z, skips, self.training and self.deep_supervision))

    @torch.jit.unused
    def forward_tasks(self, x: torch.Tensor, task_ids: Sequence[int]) -> torch.Tensor:
        """All-task inference: one pass, the same logits for every task. x (B, C, X, Y, Z), T ids -> (B, T, K, ...)."""
        as_task_ids(list(task_ids), len(task_ids), self.num_tasks)
        skips, z = self.encode(x)
        logits = self.decode(z, skips, all_heads=False)[0]
        return logits.unsqueeze(1).expand(-1, len(task_ids), -1, -1, -1, -1)


class DoDNet(UniSegBackbone):
    """DoDNet (Zhang et al., CVPR 2021) on UniSeg's encoder-decoder: a task code (one-hot, or a fixed embedding
    table for CLIP-DoDNet) is concatenated with the globally average-pooled bottleneck features; a 1x1x1 controller
    turns them into the weights and biases of a per-sample dynamic head (1x1x1 convs 8 -> 8 -> 8 -> classes, ReLU
    between) applied to the last decoder stage's features reduced to 8 channels (conv block 1x1x1).

    Args:
        num_tasks: N.
        num_classes: output channels (max classes over tasks, incl. background).
        task_embeddings: CLIP-DoDNet: a ``.pt`` (tensor) or ``.npy`` file of shape (N, D), one fixed vector per task
            in task-id order (e.g. text embeddings you computed); stored in the model (buffer ``task_codes``), not
            learned. None: one-hot codes (D = N).
        task_code_dim: D of an embedding table whose values come from a model file (set by ``network_def``).
        other arguments: as :class:`~uniseg_monai.networks.UniSegBackbone`.

    Deep supervision: the lower-resolution heads are the backbone's static heads (task-blind); the dynamic head
    gives the full-resolution logits. ``forward(x, task_id)`` as UniSeg: one id or one per sample.
    """

    head_keys = ("heads.", "controller.")

    def __init__(
        self,
        num_tasks: int = 11,
        num_classes: int = 4,
        in_channels: Sequence[int] = PAPER_IN_CHANNELS,
        features: Sequence[int] = PAPER_FEATURES,
        kernel_sizes: Sequence[Sequence[int] | int] = PAPER_KERNEL_SIZES,
        strides: Sequence[Sequence[int] | int] = PAPER_STRIDES,
        task_embeddings: str | None = None,
        task_code_dim: int | None = None,
        deep_supervision: bool = True,
    ) -> None:
        super().__init__(num_classes, in_channels, features, kernel_sizes, strides, deep_supervision)
        self.num_tasks = num_tasks
        codes = _task_codes(num_tasks, task_embeddings, task_code_dim)
        self.register_buffer("task_codes", codes)  # (N, D): saved with the weights, never trained
        self.init_args = {"num_tasks": int(num_tasks), **self.init_args}
        if task_embeddings is not None or task_code_dim is not None:
            self.init_args["task_code_dim"] = int(codes.shape[1])
        # the full-resolution head becomes the reduction to the dynamic head's 8 channels
        self.heads[-1] = Convolution(3, features[0], HEAD_CHANNELS, kernel_size=1, act="relu", norm=("group", {
            "num_groups": 1}))  # fmt: skip
        c, k = HEAD_CHANNELS, num_classes
        self.weight_shapes = [(c, c), (c, c), (k, c)]
        self.num_params = sum(o * i + o for o, i in self.weight_shapes)
        self.controller = nn.Conv3d(features[-1] + codes.shape[1], self.num_params, kernel_size=1)

    def task_ids(self, task_id: torch.Tensor, batch_size: int) -> torch.Tensor:
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            return task_id.long().flatten().expand(batch_size)
        return self._checked_task_ids(task_id, batch_size)

    @torch.jit.unused
    def _checked_task_ids(self, task_id: TaskId, batch_size: int) -> torch.Tensor:
        return as_task_ids(task_id, batch_size, self.num_tasks, self.task_codes.device)

    def head_parameters(self, z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Bottleneck features (B, F, *s) and task ids (B,) -> the dynamic heads' flat parameters (B, P)."""
        pooled = F.adaptive_avg_pool3d(z, 1)  # (B, F, 1, 1, 1)
        code = self.task_codes.index_select(0, ids.to(self.task_codes.device)).to(z.dtype)
        return self.controller(torch.cat([pooled, code[:, :, None, None, None]], dim=1)).flatten(1)

    def dynamic_head(self, features: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Features (B, 8, X, Y, Z) through each sample's own 1x1x1 convs (grouped conv) -> (B, classes, X, Y, Z)."""
        b = features.shape[0]
        x = features.reshape(1, -1, features.shape[2], features.shape[3], features.shape[4])
        start = 0
        for i, (out_ch, in_ch) in enumerate(self.weight_shapes):
            weight = params[:, start : start + out_ch * in_ch].reshape(b * out_ch, in_ch, 1, 1, 1)
            start += out_ch * in_ch
            bias = params[:, start : start + out_ch].reshape(b * out_ch)
            start += out_ch
            x = F.conv3d(x, weight, bias, groups=b)
            if i < len(self.weight_shapes) - 1:
                x = F.relu(x)
        return x.reshape(b, -1, features.shape[2], features.shape[3], features.shape[4])

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, task_id: torch.Tensor
    ) -> Union[torch.Tensor, list[torch.Tensor]]:  # noqa: UP007
        ids = self.task_ids(task_id, x.shape[0])
        skips, z = self.encode(x)
        logits = self.decode(z, skips, self.training and self.deep_supervision)
        logits[0] = self.dynamic_head(logits[0], self.head_parameters(z, ids))
        return self.output(logits)

    @torch.jit.unused
    def forward_tasks(self, x: torch.Tensor, task_ids: Sequence[int]) -> torch.Tensor:
        """All-task inference: encoder and decoder once (they do not depend on the task), then each task's
        dynamic head. Equals ``forward(x, t)`` for each t. x (B, C, X, Y, Z), T ids -> (B, T, K, X, Y, Z)."""
        ids = self._checked_task_ids(list(task_ids), len(task_ids))
        skips, z = self.encode(x)
        features = self.decode(z, skips, all_heads=False)[0]
        heads = [
            self.dynamic_head(features, self.head_parameters(z, ids[i : i + 1].expand(x.shape[0])))
            for i in range(ids.numel())
        ]
        return torch.stack(heads, dim=1)


class CLIPDoDNet(DoDNet):
    """CLIP-DoDNet: :class:`DoDNet` with a fixed task-embedding table instead of one-hot codes. ``task_embeddings``:
    a ``.pt`` / ``.npy`` file of shape (N, D), one vector per task in task-id order (e.g. CLIP text embeddings of
    the task names, computed by you; this package does not generate them); or, when rebuilt from a model file,
    ``task_code_dim`` = D (the table is in the weights)."""

    def __init__(self, *args: Any, task_embeddings: str | None = None, task_code_dim: int | None = None, **kwargs: Any):
        if not task_embeddings and task_code_dim is None:
            raise UsageError(
                "CLIP-DoDNet needs its task embedding table: --task_embeddings FILE (.pt or .npy, shape (tasks, D), "
                "one row per task in task-id order)"
            )
        super().__init__(*args, task_embeddings=task_embeddings or None, task_code_dim=task_code_dim, **kwargs)


def _task_codes(num_tasks: int, path: str | None, dim: int | None) -> torch.Tensor:
    """One-hot codes (N, N), the table in ``path`` (N, D), or zeros (N, ``dim``) that a model file fills."""
    if path is None:
        return torch.eye(num_tasks) if dim is None else torch.zeros(num_tasks, dim)
    try:
        if str(path).endswith(".npy"):
            table = torch.as_tensor(np.load(path, allow_pickle=False), dtype=torch.float32)
        else:
            table = torch.as_tensor(torch.load(path, map_location="cpu", weights_only=True), dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as err:
        raise UsageError(
            f"{path}: cannot read the task embedding table ({err}); give a .pt tensor or .npy array"
        ) from None
    if table.ndim != 2 or table.shape[0] != num_tasks or not torch.isfinite(table).all():
        raise UsageError(
            f"{path}: the task embedding table must be finite numbers of shape (num_tasks={num_tasks}, D), one row "
            f"per task in task-id order; got shape {tuple(table.shape)}"
        )
    return table
