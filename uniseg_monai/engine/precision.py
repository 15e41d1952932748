"""Mixed precision of the bundles: the ``amp_dtype`` id as ``torch.autocast`` arguments, and loss scaling only
where float16 needs it.

``amp`` (on for CUDA) switches autocast on; ``amp_dtype`` picks the lower precision: ``bfloat16`` (default: float32's
exponent range, so no loss scaling; Ampere and newer GPUs) or ``float16`` (older GPUs, e.g. the official README's
RTX 2080 Ti; gradients need a ``GradScaler``). InstanceNorm is not on autocast's float32 list: it runs on the
low-precision conv output and returns it in that dtype, but its mean and variance accumulate in float32 (the CUDA
batch-norm kernels it calls, and inductor's decomposition, compute statistics in float32), as in nnU-Net's AMP
training; Dice + CE get the float32 softmax of :class:`~uniseg_monai.engine.losses.TaskDeepSupervisionLoss`.
"""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events

from uniseg_monai.core.errors import UsageError

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_kwargs(dtype: str = "bfloat16") -> dict[str, torch.dtype]:
    """``{"dtype": ...}`` for ``torch.autocast`` (MONAI engines' ``amp_kwargs``) from the ``amp_dtype`` id."""
    if dtype not in AMP_DTYPES:
        raise UsageError(f"--amp_dtype must be one of {list(AMP_DTYPES)}, got {dtype!r}")
    return {"dtype": AMP_DTYPES[dtype]}


def scaler_enabled(engine: Engine) -> bool:
    """Whether ``engine`` trains with AMP and a ``GradScaler`` that scales (float16)."""
    scaler = getattr(engine, "scaler", None)
    return bool(getattr(engine, "amp", False)) and scaler is not None and scaler.is_enabled()


class LossScaling:
    """MONAI's trainer makes a ``GradScaler`` whenever ``amp`` is on (and autocasts only then); loss scaling exists
    for float16's narrow range. Under bfloat16 this handler swaps in a disabled scaler when the run starts:
    ``scale``, ``unscale_`` and ``update`` pass through, ``step`` is the optimiser's, no step is skipped, and a
    non-finite loss stops the run at once (:class:`~uniseg_monai.engine.guards.NonFiniteGuard`)."""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if getattr(engine, "amp", False) and engine.amp_kwargs.get("dtype") == torch.bfloat16:
            engine.scaler = torch.amp.GradScaler("cuda", enabled=False)
