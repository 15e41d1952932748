"""Network outputs for tests beyond what ``forward`` returns in the caller's mode."""

from __future__ import annotations

import torch


def all_heads(net: torch.nn.Module, x: torch.Tensor, task_id=None) -> list[torch.Tensor]:
    """All deep-supervision logits of a UniSeg or UniSegBackbone, highest resolution first, without gradients.

    Runs ``net`` in ``train()`` mode with deep supervision, which computes what ``eval()`` mode does (instance
    norm without running statistics, no dropout), then restores its mode and ``deep_supervision``.
    x (B, C, X, Y, Z); task_id as ``UniSeg.forward`` (None for the backbone).
    """
    training, deep_supervision = net.training, net.deep_supervision
    net.train()
    net.deep_supervision = True
    try:
        with torch.no_grad():
            return net(x) if task_id is None else net(x, task_id)
    finally:
        net.train(training)
        net.deep_supervision = deep_supervision
