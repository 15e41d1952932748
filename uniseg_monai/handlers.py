"""Ignite handlers the bundles use beyond MONAI's: gradient clipping, resuming from the latest checkpoint (exactly:
see :mod:`uniseg_monai.random_states`), the learning rate as a metric."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.engines import IterationEvents
from monai.handlers import CheckpointLoader

from uniseg_monai.errors import UsageError, flag
from uniseg_monai.model_files import trainer_entries
from uniseg_monai.precision import scaler_enabled
from uniseg_monai.run_folder import resume_checkpoint


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


class ResumeCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` of the newest ``checkpoint_epoch=N.pt`` in ``ckpt_dir`` when ``resume`` (a
    bundle's ``--resume true``), restoring ``load_dict`` and the engine it is attached to (``trainer``); attaches
    nothing otherwise.

    It loads when it is attached, i.e. while the trainer is built: after the DataLoaders (whose creation reseeds
    the transforms and the torch generator) and before ``run()``, so that ignite's first line names the iteration
    and epoch the run continues from, and nothing draws from the restored random states before the first epoch
    does. The :func:`~uniseg_monai.model_files.trainer_entries` (AMP scaler, gradient buffers) are restored too.

    Entries of ``load_dict`` that the checkpoint lacks (one written before they were saved) are skipped with a
    warning that the resume is not exact; an object with ``set_epoch`` (the sampler) then continues at the
    checkpoint's epoch. A checkpoint that already reached ``max_epochs`` is refused (ignite would start over), and so
    is one trained with another learning rate, momentum, weight decay, poly power or iterations per epoch
    (:func:`changed_settings`).
    """

    def __init__(
        self, ckpt_dir: str | Path, resume: bool, load_dict: Mapping[str, Any], map_location: Any = None
    ) -> None:
        self.resume = flag(resume, "resume")
        path = resume_checkpoint(ckpt_dir) if self.resume else str(Path(ckpt_dir) / "none")
        super().__init__(load_path=path, load_dict=dict(load_dict), map_location=map_location)

    def attach(self, engine: Engine) -> None:
        if self.resume:
            if self._name is None:
                self.logger = engine.logger
            self.load_dict["trainer"] = engine
            self(engine)

    def __call__(self, engine: Engine) -> None:
        try:
            checkpoint = torch.load(self.load_path, map_location=self.map_location, weights_only=True)
        except Exception as err:  # a truncated or foreign file: the earlier checkpoints are still there
            raise UsageError(
                f"{self.load_path}: cannot be read ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                "move it away to resume from the previous checkpoint_epoch=N.pt"
            ) from None
        if not isinstance(checkpoint, Mapping) or not {"model", "trainer"} <= set(checkpoint):
            raise UsageError(f"{self.load_path}: not a training checkpoint (no model and trainer state to resume)")
        changed = changed_settings(checkpoint, self.load_dict, engine)
        if changed:
            raise UsageError(
                f"{self.load_path}: this run was trained with {', '.join(changed)}; resume with that run's values, or "
                "start a new run in another --ckpt_dir"
            )
        extras = trainer_entries(engine, self.load_dict["model"]) if "model" in self.load_dict else {}
        entries = {**self.load_dict, **extras}
        present = {k: v for k, v in entries.items() if k in checkpoint}
        missing = [k for k in entries if k not in checkpoint]
        prior_max_epochs = engine.state.max_epochs
        try:
            Checkpoint.load_objects(to_load=present, checkpoint=checkpoint, strict=self.strict)
        except RuntimeError as err:  # a size mismatch: the run is resumed with other network settings
            saved = checkpoint.get("network_def", {})
            ours = getattr(self.load_dict.get("model"), "network_def", dict)()
            differ = sorted(k for k in {*saved, *ours} if saved.get(k) != ours.get(k)) or ["the network's shapes"]
            raise UsageError(
                f"{self.load_path}: was trained with other settings ({', '.join(differ)} differ); resume with the ids "
                "of that run (e.g. --patch_size, --base_features), or start a new run in another --ckpt_dir"
            ) from err
        engine.state.max_epochs = prior_max_epochs
        if prior_max_epochs is not None and engine.state.epoch >= prior_max_epochs:
            raise UsageError(
                f"{self.load_path}: this run already trained {engine.state.epoch} epochs and --epochs is "
                f"{prior_max_epochs}; pass a larger --epochs to continue it (the poly schedule is stretched to it)"
            )
        _stretch_poly_schedule(self.load_dict.get("lr_scheduler"), prior_max_epochs, self.logger)
        for key in missing:
            if hasattr(entries[key], "set_epoch"):
                entries[key].set_epoch(engine.state.epoch)
        if missing:
            self.logger.warning(
                f"{self.load_path} was written before {', '.join(missing)} were saved in checkpoints: they are not "
                "restored (a sampler continues at the checkpoint's epoch) and the resumed run will not be exactly "
                "the uninterrupted one"
            )
        self.logger.info(
            f"Restored {', '.join(present)} from {self.load_path}: iteration {engine.state.iteration}, "
            f"epoch {engine.state.epoch}"
        )


OPTIMIZER_IDS = {"initial_lr": "learning_rate", "momentum": "momentum", "weight_decay": "weight_decay"}


def changed_settings(checkpoint: Mapping[str, Any], load_dict: Mapping[str, Any], engine: Engine) -> list[str]:
    """The run settings of a checkpoint that a resumed run would silently replace or mix with its own, as ``"id
    saved (now ours)"``: the optimizer's learning rate (``initial_lr``, the poly schedule's base; ``lr`` without a
    scheduler), momentum and weight decay, and the poly schedule's power (loading restores the checkpoint's), and the
    iterations per epoch (ignite would count the checkpoint's iterations in epochs of the new length). ``--epochs``
    may change: the schedule is stretched (:func:`_stretch_poly_schedule`)."""
    found = []
    optimizer, saved = load_dict.get("optimizer"), checkpoint.get("optimizer", {}).get("param_groups", [])
    if optimizer is not None and saved:
        ours = optimizer.param_groups[0]
        keys = {**OPTIMIZER_IDS, **({} if "initial_lr" in ours else {"lr": "learning_rate"})}
        found += [(name, saved[0].get(key), ours.get(key)) for key, name in keys.items()]
    scheduler = load_dict.get("lr_scheduler")
    if isinstance(scheduler, torch.optim.lr_scheduler.PolynomialLR):
        found.append(("poly_power", checkpoint.get("lr_scheduler", {}).get("power"), scheduler.power))
    found.append(("iterations_per_epoch", checkpoint.get("trainer", {}).get("epoch_length"), engine.state.epoch_length))
    return [f"{name} {old} (now {new})" for name, old, new in found if None not in (old, new) and old != new]


def _stretch_poly_schedule(scheduler: Any, epochs: int | None, logger: Any) -> None:
    """A resumed run with another ``--epochs``: the checkpoint's ``PolynomialLR`` would keep its old total (and a
    run extended past it would train at learning rate 0); set the total to ``epochs`` and the learning rate to the
    poly value at the current epoch of the new schedule."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.PolynomialLR) or epochs is None:
        return
    if scheduler.total_iters == epochs:
        return
    old, scheduler.total_iters = scheduler.total_iters, epochs
    factor = (1.0 - min(scheduler.last_epoch, epochs) / epochs) ** scheduler.power
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * factor
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    logger.info(f"poly learning-rate schedule stretched from {old} to {epochs} epochs: lr {scheduler._last_lr[0]:.3g}")


class LearningRateMetric:
    """Record the learning rate of the ending epoch as the engine metric ``lr`` (the first parameter group's), so
    ``StatsHandler`` prints it and ``TensorBoardStatsHandler`` logs it (attach it before the scheduler's handler)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        engine.state.metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
