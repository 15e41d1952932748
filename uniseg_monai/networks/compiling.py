"""``torch.compile`` of a bundle's network, switched by the bundle id ``compile``."""

from __future__ import annotations

from torch import nn

from uniseg_monai.core.errors import flag


def compiled(network: nn.Module, enabled: bool | str = False) -> nn.Module:
    """``network`` itself, its forward compiled in place by ``torch.compile`` when ``enabled`` (the bundles'
    ``compile`` id: on for CUDA, off for CPU, as nnU-Net v2 trains).

    In place (``nn.Module.compile``) rather than ``torch.compile(network)``, whose ``OptimizedModule`` wrapper
    prefixes every state-dict key with ``_orig_mod.``: the optimiser, checkpoints and model files see the plain
    module, so a model trained compiled loads into an uncompiled network and the other way round. Compilation
    happens at the first call of each kind (training, evaluation).
    """
    if flag(enabled, "compile"):
        network.compile()
    return network
