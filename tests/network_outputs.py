"""Network outputs for tests beyond what ``forward`` returns in the caller's mode."""

from __future__ import annotations

import numpy as np
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


def assert_equal_but_near_ties(labels: np.ndarray, expected: np.ndarray, probs: np.ndarray, tol: float = 1e-4) -> None:
    """Label maps (X, Y, Z) of two computation paths that agree to float rounding: equal, except at near-ties,
    voxels where ``expected``'s pass gives its two most probable classes ``probs`` (C, X, Y, Z) within ``tol`` of
    each other and both maps pick one of the two. Fails on any other difference."""
    assert labels.shape == expected.shape == probs.shape[1:]
    where = np.nonzero(labels != expected)
    p = probs[(slice(None), *where)]  # (C, n): the differing voxels
    second, first = np.sort(p, axis=0)[-2:]
    chosen = [np.take_along_axis(p, m[where][None].astype(np.int64), 0)[0] for m in (labels, expected)]
    near = (first - second <= tol) & (chosen[0] >= second - tol) & (chosen[1] >= second - tol)
    assert near.all(), (
        f"{(~near).sum()} of {labels.size} voxels differ by more than a near-tie (top-two margin > {tol}), e.g. at "
        f"{[int(w[~near][0]) for w in where]}: {labels[where][~near][0]} vs {expected[where][~near][0]}"
    )
