"""Ignite handlers the bundles use beyond MONAI's: gradient clipping, resuming from the latest checkpoint, the
learning rate as a metric."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines import IterationEvents
from monai.handlers import CheckpointLoader

from uniseg_monai.errors import flag
from uniseg_monai.run_folder import resume_checkpoint


class GradientClipping:
    """Clip the global gradient norm to ``max_norm`` after every backward pass (nnU-Net: 12).

    With AMP the gradients are unscaled first, as ``torch.amp.GradScaler`` requires.
    """

    def __init__(self, max_norm: float = 12.0) -> None:
        self.max_norm = max_norm

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None:
            scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm)


class ResumeCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` of the newest ``checkpoint_epoch=N.pt`` in ``ckpt_dir`` when ``resume`` (a
    bundle's ``--resume true``), restoring ``load_dict`` and the engine it is attached to (``trainer``); attaches
    nothing otherwise."""

    def __init__(
        self, ckpt_dir: str | Path, resume: bool, load_dict: Mapping[str, Any], map_location: Any = None
    ) -> None:
        self.resume = flag(resume, "resume")
        path = resume_checkpoint(ckpt_dir) if self.resume else str(Path(ckpt_dir) / "none")
        super().__init__(load_path=path, load_dict=dict(load_dict), map_location=map_location)

    def attach(self, engine: Engine) -> None:
        if self.resume:
            self.load_dict["trainer"] = engine
            super().attach(engine)


class LearningRateMetric:
    """Record the learning rate of the ending epoch as the engine metric ``lr`` (the first parameter group's), so
    ``StatsHandler`` prints it and ``TensorBoardStatsHandler`` logs it (attach it before the scheduler's handler)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        engine.state.metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
