"""Training never turns bad numbers into a model: :class:`NonFiniteGuard` stops a run at the first NaN / Inf."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines import IterationEvents

from uniseg_monai.core.errors import NonFiniteError
from uniseg_monai.engine.precision import scaler_enabled

FIX = (
    "the weights were not updated, so the last checkpoint_epoch=N.pt is the last good state (continue with --resume "
    "true once fixed); check the images with `uniseg check-data DATALIST`, or lower --learning_rate"
)


def _names(batch: Any) -> str:
    """The files and tasks of a batch (dict of collated items), for messages."""
    if not isinstance(batch, Mapping):
        return "unknown files"
    image = batch.get("image")
    files = getattr(image, "meta", {}).get("filename_or_obj", []) if image is not None else []
    files = list(dict.fromkeys([files] if isinstance(files, str) else [str(f) for f in files]))
    tasks = sorted({str(t) for t in batch.get("task", [])}) if isinstance(batch.get("task"), (list, tuple)) else []
    return f"task(s) {', '.join(tasks) or '?'}, files {', '.join(str(f) for f in files) or '?'}"


class NonFiniteGuard:
    """Stop training with a :class:`~uniseg_monai.core.errors.NonFiniteError` naming the epoch, iteration, tasks and
    files of the batch at the first
    - input batch holding NaN / Inf voxels in its images or labels (when the iteration starts),
    - non-finite loss (before the backward pass) or gradient (before the optimiser step),
    so the weights stay finite and the last checkpoint remains the last good state (checkpoints are written at
    epoch ends). With float16 AMP (the engine's ``GradScaler`` is enabled) a non-finite loss or gradient is the
    scaler's business: it skips that step and lowers its scale; only ``max_skipped_steps`` consecutive skips stop the
    run. With bfloat16 AMP the scaler is disabled (:class:`~uniseg_monai.engine.precision.LossScaling`) and the first
    non-finite loss or gradient stops the run, as without AMP.
    Attach it after :class:`~uniseg_monai.engine.handlers.GradientClipping` (which unscales AMP gradients first).
    """

    def __init__(self, max_skipped_steps: int = 10) -> None:
        self.max_skipped_steps = max_skipped_steps
        self.skipped = 0  # consecutive non-finite steps under AMP
        self._bad_iteration = -1

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self.check_inputs)
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self.check_loss)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self.check_gradients)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.count_skipped)

    def _where(self, engine: Engine) -> str:
        return f"epoch {engine.state.epoch}, iteration {engine.state.iteration} ({_names(engine.state.batch)})"

    def _non_finite(self, engine: Engine, what: str) -> None:
        if scaler_enabled(engine):
            self._bad_iteration = engine.state.iteration  # the scaler skips this step
            return
        raise NonFiniteError(f"non-finite {what} at {self._where(engine)}: {FIX}")

    def check_inputs(self, engine: Engine) -> None:
        batch = engine.state.batch
        for key in ("image", "label"):
            x = batch.get(key) if isinstance(batch, Mapping) else None
            if isinstance(x, torch.Tensor) and x.is_floating_point() and not torch.isfinite(x).all():
                bad = int((~torch.isfinite(x)).sum())
                raise NonFiniteError(
                    f"{bad} NaN / Inf voxels in the input batch at {self._where(engine)}: fix or remove these "
                    f"{'images' if key == 'image' else 'labels'} (`uniseg check-data DATALIST` lists every such file); "
                    "no weights were updated with them"
                )

    def check_loss(self, engine: Engine) -> None:
        loss = engine.state.output["loss"]
        if not torch.isfinite(loss).all():
            self._non_finite(engine, f"loss ({float(loss.detach().float().mean())})")

    def check_gradients(self, engine: Engine) -> None:
        grads = [p.grad for p in engine.network.parameters() if p.grad is not None]
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            self._non_finite(engine, "gradient")

    def count_skipped(self, engine: Engine) -> None:
        self.skipped = self.skipped + 1 if self._bad_iteration == engine.state.iteration else 0
        if self.skipped >= self.max_skipped_steps:
            raise NonFiniteError(
                f"{self.skipped} consecutive steps with non-finite loss or gradients under float16 AMP (last at "
                f"{self._where(engine)}): {FIX}, or train with --amp false"
            )
