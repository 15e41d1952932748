"""The random states a training run draws from, as one checkpoint entry, so that a resumed run continues exactly
where the uninterrupted run would be.

:class:`RandomStates` saves and restores torch's CPU generator (and the CUDA generators once CUDA is in use),
numpy's global generator, python's ``random`` and the ``R`` of every MONAI ``Randomizable`` inside the training
transform (the crop and the augmentations, nested ones included). Everything is stored as tensors and plain python
values, so checkpoints stay loadable with ``torch.load(weights_only=True)``.

Which of these a run really draws from: with ``num_workers = 0`` the transforms run in the main process on their
own ``R``; with ``num_workers > 0`` MONAI's DataLoader seeds the workers' copies of the transforms from the main
torch generator each time an epoch's iterator is created, so the torch state decides them.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable, Transform

logger = logging.getLogger(__name__)


def randomizables(transform: Any) -> list[Randomizable]:
    """Every MONAI ``Randomizable`` in ``transform``, depth first in attribute order: the transform itself, the
    transforms of a ``Compose`` (``OneOf``, ...) and the transforms a dictionary transform wraps (``RandZoomd``'s
    ``RandZoom`` draws from its own ``R``). Only MONAI transforms and the lists, tuples and dicts they hold are
    searched; each object is listed once."""
    found: list[Randomizable] = []
    seen: set[int] = set()

    def walk(obj: Any) -> None:
        if isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item)
        elif isinstance(obj, Mapping):
            for item in obj.values():
                walk(item)
        elif isinstance(obj, (Transform, Randomizable)) and id(obj) not in seen:
            seen.add(id(obj))
            if isinstance(obj, Randomizable):
                found.append(obj)
            for value in vars(obj).values():
                walk(value)

    walk(transform)
    return found


def _numpy_state(state: tuple) -> dict[str, Any]:
    """``RandomState.get_state()`` as a tensor and plain values (weights-only loadable)."""
    kind, keys, pos, has_gauss, gauss = state
    if kind != "MT19937":
        raise ValueError(f"unsupported numpy bit generator {kind!r}")
    return {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}  # fmt: skip


def _numpy_tuple(state: Mapping[str, Any]) -> tuple:
    keys = state["keys"].cpu().numpy().astype(np.uint32)
    return "MT19937", keys, int(state["pos"]), int(state["has_gauss"]), float(state["gauss"])


def _name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


class RandomStates:
    """The random states of a training run as a checkpoint entry (``state_dict`` / ``load_state_dict``).

    Args:
        transform: the training dataset's transform; the ``R`` of every ``Randomizable`` in it
            (:func:`randomizables`) is saved and restored. None: only the global generators.

    The checkpoint saver calls :meth:`state_dict` at the end of an epoch, after validation (whose DataLoader draws
    from the torch generator too), which is the state the next epoch starts from. :meth:`load_state_dict` must
    run after ``set_determinism`` and after everything built before training starts (a DataLoader with
    ``num_workers = 0`` reseeds the transforms and resets the torch generator when it is created), and nothing may
    draw before the first epoch: :class:`uniseg_monai.engine.checkpoints.ResumeCheckpointLoader` loads when the trainer
    is built. A checkpoint whose transforms differ (another config) restores the global generators only, with a
    warning.
    """

    def __init__(self, transform: Any = None) -> None:
        self.transform = transform

    def transforms(self) -> list[Randomizable]:
        return randomizables(self.transform) if self.transform is not None else []

    def state_dict(self) -> dict[str, Any]:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        return {
            "torch": torch.get_rng_state(),
            "cuda": list(cuda),  # empty until CUDA is used: the generators still hold set_determinism's seed
            "numpy": _numpy_state(np.random.get_state()),  # noqa: NPY002 - the legacy global generator is state
            "python": random.getstate(),
            "transforms": [{"name": _name(t), "state": _numpy_state(t.R.get_state())} for t in self.transforms()],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        torch.set_rng_state(state["torch"].cpu())  # a map_location may have moved it
        cuda = [s.cpu() for s in state.get("cuda", [])]
        if cuda and torch.cuda.is_available():
            if len(cuda) != torch.cuda.device_count():
                logger.warning(
                    "the checkpoint holds the random states of %d CUDA devices, this machine has %d: the resumed run "
                    "is not exact", len(cuda), torch.cuda.device_count(),
                )  # fmt: skip
            for device, device_state in zip(range(torch.cuda.device_count()), cuda, strict=False):
                torch.cuda.set_rng_state(device_state, device)
        np.random.set_state(_numpy_tuple(state["numpy"]))  # noqa: NPY002
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        ours, saved = self.transforms(), list(state.get("transforms", []))
        if [_name(t) for t in ours] != [s["name"] for s in saved]:
            logger.warning(
                "the training transforms differ from those of the checkpoint (%d random transforms here, %d saved): "
                "their random states are not restored and the resumed run is not exact", len(ours), len(saved),
            )  # fmt: skip
            return
        for transform, entry in zip(ours, saved, strict=True):
            transform.R.set_state(_numpy_tuple(entry["state"]))
