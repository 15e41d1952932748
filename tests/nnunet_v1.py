"""Checkpoints as nnU-Net v1's ``NetworkTrainer.save_checkpoint`` (and so the official UniSeg release) saves them:
training state with numpy float64 scalars, pickled under the numpy 1.x name (the 2023 release) or numpy 2's."""

from __future__ import annotations

import pickle
import types
from pathlib import Path

import numpy as np
import torch

SCALAR = np._core.multiarray.scalar


class _Numpy1Pickler(pickle._Pickler):
    """Writes numpy scalars' reconstructor as numpy 1.x did: ``GLOBAL 'numpy.core.multiarray scalar'``."""

    def save_global(self, obj, name=None):
        if obj is SCALAR:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\nscalar\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


PICKLE_MODULES = {
    "numpy1": types.SimpleNamespace(__name__="pickle", Pickler=_Numpy1Pickler),
    "numpy2": pickle,
}


def nnunet_v1_container(state_dict: dict[str, torch.Tensor], epochs: int = 3) -> dict:
    """The dict nnU-Net v1 saves: SGD state with momentum buffers, curves of np.mean results, a best-epoch tuple."""
    losses = [np.mean(np.array([0.5, 0.4], np.float32) / (e + 1)) for e in range(epochs)]  # np.float32
    dice = [np.mean([0.7, 0.8 + e / 100]) for e in range(epochs)]  # np.float64
    return {
        "epoch": epochs,
        "state_dict": state_dict,
        "optimizer_state_dict": {
            "state": {i: {"momentum_buffer": torch.zeros_like(v)} for i, v in enumerate(state_dict.values())},
            "param_groups": [
                {
                    "lr": 0.01,
                    "momentum": 0.99,
                    "dampening": 0,
                    "weight_decay": 3e-05,
                    "nesterov": True,
                    "params": list(range(len(state_dict))),
                }
            ],
        },
        "lr_scheduler_state_dict": None,
        "plot_stuff": (losses, losses, losses, dice),
        "best_stuff": (epochs - 1, losses[-1], dice[-1]),
        "amp_grad_scaler": {
            "scale": 65536.0,
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": 2000,
            "_growth_tracker": 12,
        },
    }


def save_nnunet_v1(obj: dict, path: Path, spelling: str = "numpy1") -> Path:
    """``torch.save`` with numpy scalars pickled under ``spelling`` (``numpy1`` or ``numpy2``)."""
    torch.save(obj, path, pickle_module=PICKLE_MODULES[spelling], pickle_protocol=2)
    return path
