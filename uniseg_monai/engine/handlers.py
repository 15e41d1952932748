"""Ignite handlers the bundles use beyond MONAI's: gradient clipping and the learning rate as a metric (resuming from
the latest checkpoint: :mod:`uniseg_monai.engine.checkpoints`)."""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events
from monai.engines import IterationEvents

from uniseg_monai.engine.precision import scaler_enabled


class GradientClipping:
    """Clip the global gradient norm to ``max_norm`` after every backward pass (nnU-Net: 12).

    With float16 AMP the gradients are unscaled first, as ``torch.amp.GradScaler`` requires.
    """

    def __init__(self, max_norm: float = 12.0) -> None:
        self.max_norm = max_norm

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if scaler_enabled(engine):
            engine.scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm)


class LearningRateMetric:
    """Record the learning rate of the ending epoch as the engine metric ``lr`` (the first parameter group's), so
    ``StatsHandler`` prints it and ``TensorBoardStatsHandler`` logs it (attach it before the scheduler's handler)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        engine.state.metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
