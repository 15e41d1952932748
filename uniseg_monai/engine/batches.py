"""What the training engine hands the network: the batch's image and label as plain tensors."""

from __future__ import annotations

from typing import Any

import torch
from monai.data import MetaTensor
from monai.engines import PrepareBatchExtraInput


def _plain(x: Any) -> Any:
    return x.as_tensor() if isinstance(x, MetaTensor) else x


class PlainPrepareBatch(PrepareBatchExtraInput):
    """``PrepareBatchExtraInput`` (image (B, C, X, Y, Z), label (B, 1, X, Y, Z), ``extra_keys`` as keyword arguments)
    with image and label as plain tensors. A MetaTensor input makes every operation of the forward and backward pass
    a MetaTensor operation (``__torch_function__``, meta data copied to each output), a share of every training step
    (``benchmarks/trainer_overhead.py``). Training only: an evaluator's post-processing reads the image's meta data
    from its output, which holds the prepared image."""

    def __call__(
        self, batchdata: dict[str, torch.Tensor], device: str | torch.device | None = None, non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:  # fmt: skip
        image, label, args, extra = super().__call__(batchdata, device, non_blocking, **kwargs)
        return _plain(image), _plain(label), args, extra
