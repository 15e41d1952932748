"""The optimiser's parameter groups: the task-prompt parts (universal prompt and FUSE, ``prompt_keys`` of the
network) may take their own weight decay (bundle id ``prompt_weight_decay``)."""

from __future__ import annotations

from typing import Any

from torch import nn


def parameter_groups(network: nn.Module, weight_decay: float, prompt_weight_decay: float) -> list[dict[str, Any]]:
    """``network``'s parameters for ``torch.optim``: one group when both decays are equal (the paper's training),
    else the parameters under ``network.prompt_keys`` in a second group with ``prompt_weight_decay`` (the first
    group takes the optimiser's ``weight_decay``). A network without prompt keys gives one group."""
    keys = tuple(getattr(network, "prompt_keys", ()))
    named = list(network.named_parameters())
    prompt = [p for k, p in named if keys and k.startswith(keys)]
    if prompt_weight_decay == weight_decay or not prompt:
        return [{"params": [p for _, p in named]}]
    rest = [p for k, p in named if not (keys and k.startswith(keys))]
    return [{"params": rest}, {"params": prompt, "weight_decay": prompt_weight_decay}]
