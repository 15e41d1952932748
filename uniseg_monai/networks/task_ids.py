"""Task ids as the network, the inferers and the loss take them, and the logits that carry them to the loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch

TaskId = int | Sequence[int] | torch.Tensor


def as_task_ids(
    task_id: TaskId,
    batch_size: int,
    num_tasks: int | None = None,
    device: torch.device | str | None = None,
    owner: str = "network",
) -> torch.Tensor:
    """``task_id`` — an int or one id for the whole batch, B ints or a (B,) tensor — as a (B,) long tensor.

    Args:
        task_id: the task(s); a tensor keeps its device unless ``device`` is given.
        batch_size: B.
        num_tasks: if given, every id must lie in [0, num_tasks); checked in eager mode only (one device-to-host
            copy for a GPU tensor), not while ``torch.compile`` traces, where reading a value is a graph break.
        device: device of the result.
        owner: what knows ``num_tasks`` tasks, for the error message.

    Raises:
        ValueError: non-integer ids, a count other than 1 or B, or an id outside [0, num_tasks).
    """
    ids = torch.as_tensor(task_id, device=device)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"task_id must be integer, got dtype {ids.dtype}")
    ids = ids.long().flatten()
    if ids.numel() == 1:
        ids = ids.expand(batch_size)
    if ids.numel() != batch_size:
        raise ValueError(f"got {ids.numel()} task ids for a batch of {batch_size} samples; give one per sample")
    if num_tasks is None or not ids.numel() or torch.compiler.is_compiling():
        return ids
    if bool(((ids < 0) | (ids >= num_tasks)).any()):
        raise ValueError(f"task ids {ids.tolist()} outside [0, {num_tasks}) for this {num_tasks}-task {owner}")
    return ids


class TaskLogits(list):
    """Deep-supervision logits (highest resolution first) tagged with each sample's task id, ``task_id`` (B,).

    Produced by :class:`uniseg_monai.engine.inferers.TaskTrainingInferer`, read by
    :class:`uniseg_monai.engine.losses.TaskDeepSupervisionLoss`.
    """

    def __init__(self, logits: Sequence[torch.Tensor] | torch.Tensor, task_id: torch.Tensor) -> None:
        super().__init__([logits] if isinstance(logits, torch.Tensor) else logits)
        self.task_id = task_id
