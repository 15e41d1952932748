"""Task-aware inferers: the task id reaches the network, outputs keep only the task's classes.

MONAI engines call ``inferer(inputs, network, *args, **kwargs)``; with ``PrepareBatchExtraInput(extra_keys=
{"task_id": "task_id"})`` the batch's task ids arrive as ``task_id``. MONAI Label calls ``inferer(inputs,
network)``: then the inferer's own ``task_id`` attribute (set from the bundle's ``task`` id) is used.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, SimpleInferer, SlidingWindowInferer

from uniseg_monai.core.errors import flag
from uniseg_monai.networks.task_ids import TaskId, TaskLogits, as_task_ids

MIRROR_AXES = [axes for n in range(4) for axes in itertools.combinations((2, 3, 4), n)]  # 8 flips incl. none


def _task_ids(
    task_id: TaskId | None, batch_size: int, num_tasks: int | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """:func:`~uniseg_monai.networks.as_task_ids` (-> (B,) long), refusing a missing task."""
    if task_id is None:
        raise ValueError("no task given: pass task_id (from the batch) or set the inferer's task_id (bundle id `task`)")
    return as_task_ids(task_id, batch_size, num_tasks, device, owner="inferer")


def _meta_task_ids(inputs: torch.Tensor) -> Any:
    """The task ids :class:`~uniseg_monai.data.transforms.RecordTaskd` put into a MetaTensor's meta data, else None."""
    return inputs.meta.get("task_id") if isinstance(inputs, MetaTensor) else None


def plain(x: torch.Tensor) -> torch.Tensor:
    """A MetaTensor as a plain tensor (same storage, no meta data); other tensors unchanged."""
    return x.as_tensor() if isinstance(x, MetaTensor) else x


class PlainTensorInferer(SimpleInferer):
    """``network(inputs, ...)`` on a plain tensor: training needs no meta data, and on CPU every op on a
    MetaTensor pays Python overhead (``benchmarks/trainer_overhead.py``)."""

    def __call__(self, inputs: torch.Tensor, network: Callable, *args, **kwargs):  # type: ignore[override]
        return network(plain(inputs), *args, **kwargs)


class TaskTrainingInferer(SimpleInferer):
    """``network(inputs, task_id)`` on a plain tensor (see :class:`PlainTensorInferer`), outputs returned as
    :class:`TaskLogits` for the task-aware loss."""

    def __call__(self, inputs: torch.Tensor, network: Callable, task_id: torch.Tensor) -> TaskLogits:  # type: ignore[override]
        ids = _task_ids(task_id, inputs.shape[0], device=inputs.device)
        return TaskLogits(network(plain(inputs), task_id=ids), ids)


class MirroringSlidingWindowInferer(Inferer):
    """MONAI's sliding window with nnU-Net's options: window = training patch, Gaussian weights, mirroring TTA.

    Args:
        roi_size: window (x, y, z), the training patch.
        overlap, mode, sigma_scale, sw_batch_size, sw_device, device, progress: as MONAI's
            :class:`~monai.inferers.SlidingWindowInferer` (defaults: 0.5, Gaussian, sigma = window / 8).
        tta: average the logits of all 8 mirrorings of every window (nnU-Net's mirroring TTA, 8x cost).

    ``__call__(inputs, network)``: inputs (B, C, X, Y, Z) -> (B, classes, X, Y, Z) logits of ``network(x)``.
    """

    def __init__(
        self,
        roi_size: Sequence[int],
        overlap: float = 0.5,
        mode: str = "gaussian",
        sigma_scale: float = 0.125,
        sw_batch_size: int = 1,
        tta: bool = False,
        sw_device: torch.device | str | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__()
        self.tta = flag(tta, "tta")
        self.window = SlidingWindowInferer(
            roi_size=roi_size,
            sw_batch_size=sw_batch_size,
            overlap=overlap,
            mode=mode,
            sigma_scale=sigma_scale,
            sw_device=sw_device,
            device=device,
            progress=progress,
        )

    def mirrored(self, predict: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``predict`` averaged over the 8 mirrorings of its input when ``tta``, else ``predict`` itself."""
        if not self.tta:
            return predict

        def averaged(window: torch.Tensor) -> torch.Tensor:
            total = 0
            for axes in MIRROR_AXES:
                out = predict(torch.flip(window, axes) if axes else window)
                total = total + (torch.flip(out, axes) if axes else out)
            return total / len(MIRROR_AXES)

        return averaged

    def __call__(self, inputs: torch.Tensor, network: Callable) -> torch.Tensor:  # type: ignore[override]
        return self.window(inputs, self.mirrored(network))


class TaskSlidingWindowInferer(MirroringSlidingWindowInferer):
    """Sliding-window inference of one task per sample, logits restricted to the task's classes.

    Args:
        roi_size: window (x, y, z), the training patch.
        classes_per_task: C_t (incl. background) indexed by task id.
        task_id: default task (``--task``); int or None. The task of a call is, in this order: the call's
            ``task_id``, the ``task_id`` that pre-processing recorded in the inputs' meta data (how MONAI Label's
            ``inferer(inputs, network)`` gets it), this default.
        window: keyword arguments of :class:`MirroringSlidingWindowInferer` (overlap, mode, sigma_scale,
            sw_batch_size, tta, sw_device, device, progress).

    ``__call__(inputs, network, task_id=None)``: inputs (B, C, X, Y, Z) -> (B, max C_t, X, Y, Z) logits; when
    tasks in the batch differ, a sample's channels beyond its C_t are filled with the dtype's lowest value
    (softmax 0).
    """

    def __init__(
        self, roi_size: Sequence[int], classes_per_task: Sequence[int], task_id: int | None = None, **window: Any
    ) -> None:
        super().__init__(roi_size, **window)
        self.classes_per_task = [int(c) for c in classes_per_task]
        self.task_id = task_id

    def predictor(self, network: Callable, task_id: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Window (b, C, *roi) -> logits (b, C_t, *roi) of one task, mirrored-averaged when ``tta``."""
        classes = self.classes_per_task[task_id]
        return self.mirrored(lambda window: network(window, task_id=task_id)[:, :classes])

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: Callable, task_id: TaskId | None = None
    ) -> torch.Tensor:
        given = next((t for t in (task_id, _meta_task_ids(inputs), self.task_id) if t is not None), None)
        ids = _task_ids(given, inputs.shape[0], len(self.classes_per_task)).tolist()
        outputs = [self.window(inputs[b : b + 1], self.predictor(network, t)) for b, t in enumerate(ids)]
        width = max(o.shape[1] for o in outputs)
        if all(o.shape[1] == width for o in outputs):
            return torch.cat(outputs)
        low = torch.finfo(outputs[0].dtype).min
        padded = [torch.cat([o, o.new_full((1, width - o.shape[1], *o.shape[2:]), low)], 1) for o in outputs]
        return torch.cat(padded)


class AllTaskSlidingWindowInferer(TaskSlidingWindowInferer):
    """One sliding-window pass that segments several tasks: per window, the network's encoder and FUSE run once
    and its decoder once per task (:meth:`UniSeg.forward_tasks`); the official code instead repeats the whole
    pass per task. Equals :class:`TaskSlidingWindowInferer` run per task, and takes its arguments (``task_id``
    is not used: the tasks are given per call).

    ``__call__(inputs, network, task_ids)``: inputs (B, C, X, Y, Z), T task ids -> {task id: (B, C_t, X, Y, Z)
    logits}. The stitched output holds sum(C_t) channels at the input size: mind memory on large volumes.
    """

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: Callable, task_ids: Sequence[int]
    ) -> dict[int, torch.Tensor]:
        ids = [int(t) for t in task_ids]
        classes = [self.classes_per_task[t] for t in ids]

        def predict(window: torch.Tensor) -> torch.Tensor:  # (b, C, *roi) -> (b, sum C_t, *roi)
            logits = network.forward_tasks(window, ids)
            return torch.cat([logits[:, i, :c] for i, c in enumerate(classes)], dim=1)

        stitched = self.window(inputs, self.mirrored(predict))
        return dict(zip(ids, torch.split(stitched, classes, dim=1)))
