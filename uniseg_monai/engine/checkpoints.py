"""Training checkpoints: what a bundle run saves (:class:`ModelCheckpointSaver`: self-describing, atomic, pruned to
the newest ``keep_checkpoints``) and how a run resumes from the newest one (:class:`ResumeCheckpointLoader`: exactly,
with the trainer entries restored, or refused in one line when the run's settings changed).

A checkpoint is a model file (:mod:`uniseg_monai.model_io.model_files`) with the trainer's state added: read with the
same weights-only loader, a network mismatch explained by the same :func:`~uniseg_monai.model_io.model_files.mismatch`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver

from uniseg_monai.core.errors import NonFiniteError, UsageError, flag
from uniseg_monai.core.run_folder import CHECKPOINT_PATTERN, resume_checkpoint
from uniseg_monai.model_io.model_files import ModelFile, load_weights_only, mismatch, save_atomic
from uniseg_monai.tasks import TaskRegistry


class Entry:
    """A plain value as a ``CheckpointSaver`` entry (ignite saves ``state_dict()``; loading ignores it)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def state_dict(self) -> Any:
        return self.value

    def load_state_dict(self, state: Any) -> None:
        """The description of a loaded checkpoint is not state to restore."""


def description(network: torch.nn.Module, registry: TaskRegistry) -> dict[str, Entry]:
    """``CheckpointSaver`` entries that make a checkpoint self-describing: ``tasks``, for UniSeg networks
    ``network_def``, and for a network fine-tuned from pretrained weights their ``provenance`` (file, licence)."""
    target = network.module if hasattr(network, "module") else network
    entries = {"tasks": Entry(registry.to_json())}
    if hasattr(target, "network_def"):
        entries["network_def"] = Entry(target.network_def())
    if getattr(target, "pretrained_provenance", None):
        entries["provenance"] = Entry(target.pretrained_provenance)
    return entries


class GradScalerState:
    """A MONAI trainer's AMP ``GradScaler`` as a checkpoint entry (``{}`` without AMP). ``SupervisedTrainer.run``
    makes a new scaler, so a state loaded before the run starts is applied when it starts."""

    def __init__(self, trainer: Engine) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        scaler = getattr(self.trainer, "scaler", None)
        return dict(scaler.state_dict()) if scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.trainer.add_event_handler(Events.STARTED, self._load, dict(state))

    def _load(self, engine: Engine, state: dict[str, Any]) -> None:
        if getattr(engine, "scaler", None) is not None:
            engine.scaler.load_state_dict(state)
        engine.remove_event_handler(self._load, Events.STARTED)


class GradientBuffers:
    """Which parameters of a network hold a ``.grad`` tensor, as a checkpoint entry. MONAI's trainer zeroes the
    gradients (``zero_grad(set_to_none=False)``) instead of dropping them, so a parameter used once keeps a zero
    gradient and SGD keeps applying momentum and weight decay to it in the iterations that do not use it (UniSeg's
    task-specific layers); a resumed run recreates these zero gradients, else it would skip those updates."""

    def __init__(self, network: torch.nn.Module) -> None:
        self.network = network.module if hasattr(network, "module") else network

    def state_dict(self) -> list[str]:
        return [name for name, p in self.network.named_parameters() if p.grad is not None]

    def load_state_dict(self, names: list[str]) -> None:
        parameters = dict(self.network.named_parameters())
        for name in names:
            if name in parameters and parameters[name].grad is None:
                parameters[name].grad = torch.zeros_like(parameters[name])


def trainer_entries(trainer: Engine, network: torch.nn.Module) -> dict[str, Any]:
    """The checkpoint entries of a trainer's state beyond ignite's and the objects the bundle lists: its AMP
    scaler (``grad_scaler``), the network's gradient buffers (``gradient_buffers``) and its loader's ``batch_size``
    (checked on resume). Written by :class:`ModelCheckpointSaver` with every ``save_dict`` that has a ``trainer``,
    restored by :class:`ResumeCheckpointLoader`."""
    entries = {"grad_scaler": GradScalerState(trainer), "gradient_buffers": GradientBuffers(network)}
    return {**entries, "batch_size": Entry(_batch_size(trainer))}


def _batch_size(trainer: Engine) -> int | None:
    """The batch size of a trainer's data loader; None where it has none."""
    return getattr(getattr(trainer, "data_loader", None), "batch_size", None)


class _AtomicDiskSaver(DiskSaver):
    """ignite's ``DiskSaver`` writing through :func:`save_atomic`: never a half-written file (a run killed while
    saving keeps the previous checkpoint), mode from the umask like a plain ``open()`` (ignite's atomic writes
    leave 0600 files), ``filename`` a fixed name when given (MONAI's ``model.pt``)."""

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None) -> None:
        super().__init__(dirname, atomic=True, create_dir=True, require_empty=False)
        self.filename = filename

    def __call__(self, checkpoint: Any, filename: str, metadata: Any = None) -> None:
        path = self.dirname / (self.filename or filename)
        model = checkpoint.get("model", {}) if isinstance(checkpoint, Mapping) else {}
        bad = [k for k, v in model.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]
        if bad:  # never a NaN model on disk; the previous file stays
            raise NonFiniteError(
                f"refusing to write {path}: {len(bad)} of {len(model)} weight tensors hold NaN / Inf (first: {bad[0]});"
                " the previous file is kept: resume from the last good checkpoint_epoch=N.pt with a lower learning rate"
            )
        save_atomic(checkpoint, path)

    def remove(self, filename: str) -> None:
        if self.filename is None:  # a fixed name is replaced by the next save, not deleted first
            (self.dirname / filename).unlink(missing_ok=True)


def prune_checkpoints(folder: str | os.PathLike, keep: int, saved: str | os.PathLike | None = None) -> list[Path]:
    """Delete all but the ``keep`` highest-numbered ``checkpoint_epoch=N.pt`` in ``folder`` (those of earlier runs
    a resumed run continues included), never ``saved`` (the file just written) nor any other file; returns the
    deleted files."""
    found = sorted(
        (int(m.group(1)), p) for p in Path(folder).iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_file()
    )
    keep_names = {p.name for _, p in found[-keep:]} | ({Path(saved).name} if saved else set())
    deleted = [p for _, p in found if p.name not in keep_names]
    for path in deleted:
        path.unlink(missing_ok=True)
    return deleted


class ModelCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` writing self-describing model files: ``save_dict`` (which holds ``model``) plus
    the :func:`description` of that network and the run's ``registry``; other arguments as ``CheckpointSaver``.

    Files are written atomically with the umask's mode. With ``save_dict["trainer"]`` the :func:`trainer_entries`
    are saved too.

    Args:
        keep_checkpoints: with ``save_interval``: after each interval checkpoint, delete all but the newest
            ``keep_checkpoints`` ``checkpoint_epoch=N.pt`` of ``save_dir``, earlier runs' included (replaces
            ``n_saved``, which knows only the files of this process). None: ``n_saved`` decides.

    With ``save_key_metric`` (the best model, ``model.pt``) it has a state a resumed run needs: the best score
    so far, which decides whether the next validation replaces the file, and the evaluator's ``best_metric`` /
    ``best_metric_epoch``; :meth:`state_dict` / :meth:`load_state_dict` make it a checkpoint entry.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict[str, Any],
        registry: TaskRegistry,
        keep_checkpoints: int | None = None,
        **kwargs: Any,
    ) -> None:
        if keep_checkpoints is not None:
            if not str(keep_checkpoints).isdigit() or int(keep_checkpoints) < 1:
                raise UsageError(f"--keep_checkpoints must be 1 or more, got {keep_checkpoints}")
            kwargs["n_saved"] = None
        entries = {**save_dict, **description(save_dict["model"], registry)}
        if "trainer" in save_dict:
            entries.update(trainer_entries(save_dict["trainer"], save_dict["model"]))
        super().__init__(save_dir, entries, **kwargs)
        self.keep_checkpoints = None if keep_checkpoints is None else int(keep_checkpoints)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler = _AtomicDiskSaver(save_dir, checkpoint.save_handler.filename)
        self._engine: Engine | None = None
        self._best: dict[str, Any] = {}

    def attach(self, engine: Engine) -> None:
        self._engine = engine
        self._restore_best()
        super().attach(engine)

    def interval_completed(self, engine: Engine) -> None:
        super().interval_completed(engine)
        if self.keep_checkpoints is not None:
            saved = self._interval_checkpoint.last_checkpoint if self._interval_checkpoint is not None else None
            for path in prune_checkpoints(self.save_dir, self.keep_checkpoints, saved):
                self.logger.info(f"Deleted the older checkpoint {path.name} (keep_checkpoints={self.keep_checkpoints})")

    def state_dict(self) -> dict[str, Any]:
        """The best-model tracking: ``saved`` (ignite's list of (score, name)) and the evaluator's best metric and
        its epoch; ``{}`` for a saver without ``save_key_metric``."""
        if self._key_metric_checkpoint is None:
            return {}
        state: dict[str, Any] = {"saved": [(float(p), str(f)) for p, f in self._key_metric_checkpoint._saved]}
        engine_state = self._engine.state if self._engine is not None else None
        if getattr(engine_state, "best_metric_epoch", None) is not None:  # a MONAI workflow's
            state["best_metric"] = float(engine_state.best_metric)
            state["best_metric_epoch"] = int(engine_state.best_metric_epoch)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict`'s (or, as MONAI's ``CheckpointSaver``, ignite's ``{"_saved": ...}``)."""
        if not state_dict:
            return
        saved = state_dict.get("saved", state_dict.get("_saved"))
        if saved is not None:
            super().load_state_dict({"_saved": [tuple(item) for item in saved]})
        self._best = {k: state_dict[k] for k in ("best_metric", "best_metric_epoch") if k in state_dict}
        self._restore_best()

    def _restore_best(self) -> None:
        if self._engine is not None and self._best:
            for key, value in self._best.items():
                setattr(self._engine.state, key, value)


class ResumeCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` of the newest ``checkpoint_epoch=N.pt`` in ``ckpt_dir`` when ``resume`` (a
    bundle's ``--resume true``), restoring ``load_dict`` and the engine it is attached to (``trainer``); attaches
    nothing otherwise.

    It loads when it is attached, i.e. while the trainer is built: after the DataLoaders (whose creation reseeds
    the transforms and the torch generator) and before ``run()``, so that ignite's first line names the iteration
    and epoch the run continues from, and nothing draws from the restored random states before the first epoch
    does. The :func:`trainer_entries` (AMP scaler, gradient buffers) are restored too.

    Entries of ``load_dict`` that the checkpoint lacks (one written before they were saved) are skipped with a
    warning that the resume is not exact; an object with ``set_epoch`` (the sampler) then continues at the
    checkpoint's epoch. A checkpoint that already reached ``max_epochs`` is refused (ignite would start over), and so
    is one trained with another learning rate, momentum, weight decay, poly power, iterations per epoch or batch size
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
        checkpoint = read_training_checkpoint(self.load_path, self.map_location)
        ours = run_settings(self.load_dict.get("optimizer"), self.load_dict.get("lr_scheduler"), engine)
        refuse_changed(self.load_path, checkpoint, ours)
        extras = trainer_entries(engine, self.load_dict["model"]) if "model" in self.load_dict else {}
        entries = {**self.load_dict, **extras}
        present = {k: v for k, v in entries.items() if k in checkpoint}
        states = [k for k in entries if not isinstance(entries[k], Entry)]  # a description (batch_size) restores none
        missing = [k for k in states if k not in checkpoint]
        prior_max_epochs = engine.state.max_epochs
        ours = _schedule_lengths(self.load_dict.get("lr_scheduler"))  # this run's, from its --epochs
        try:
            Checkpoint.load_objects(to_load=present, checkpoint=checkpoint, strict=self.strict)
        except RuntimeError as err:  # a size mismatch: the run is resumed with other network settings
            network = self.load_dict.get("model")
            saved = ModelFile(Path(self.load_path), checkpoint["model"], checkpoint.get("network_def"), None, False)
            why = mismatch(getattr(network, "module", network), saved, err) if network is not None else str(err)
            raise UsageError(
                f"{self.load_path}: was trained with other settings ({why}); resume with the ids of that run, or start "
                "a new run in another --ckpt_dir"
            ) from err
        engine.state.max_epochs = prior_max_epochs
        refuse_finished(self.load_path, engine.state.epoch, prior_max_epochs)
        _stretch_poly_schedule(self.load_dict.get("lr_scheduler"), prior_max_epochs, self.logger)
        _stretch_sequential_schedule(self.load_dict.get("lr_scheduler"), ours, self.logger)
        for key in missing:
            if hasattr(entries[key], "set_epoch"):
                entries[key].set_epoch(engine.state.epoch)
        if missing:
            self.logger.warning(
                f"{self.load_path} was written before {', '.join(missing)} were saved in checkpoints: they are not "
                "restored (a sampler continues at the checkpoint's epoch) and the resumed run will not be exactly "
                "the uninterrupted one"
            )
        restored = ", ".join(k for k in states if k in present)
        self.logger.info(
            f"Restored {restored} from {self.load_path}: iteration {engine.state.iteration}, epoch {engine.state.epoch}"
        )


def read_training_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Mapping[str, Any]:
    """The checkpoint a run resumes from (weights-only loading); a :class:`UsageError` for a truncated or foreign
    file (the earlier checkpoints are still there) or one without model and trainer state."""
    fix = "move it away to resume from the previous checkpoint_epoch=N.pt"
    checkpoint = load_weights_only(path, UsageError, fix=fix, map_location=map_location)
    if not isinstance(checkpoint, Mapping) or not {"model", "trainer"} <= set(checkpoint):
        raise UsageError(f"{path}: not a training checkpoint (no model and trainer state to resume)")
    return checkpoint


def check_resume(ckpt_dir: str | Path, resume: bool, epochs: int, **settings: Any) -> bool:
    """Before any data is cached (a bundle's ``initialize``): with ``resume``, refuse in one line a checkpoint the
    run could not continue, as :class:`ResumeCheckpointLoader` later would: one that already reached ``epochs``, or
    one trained with other ``settings`` (the bundle's ids: ``learning_rate``, ``momentum``, ``weight_decay``,
    ``prompt_weight_decay``, ``poly_power``, ``iterations_per_epoch``, ``batch_size``; :func:`changed_settings`).
    True, for ``initialize``."""
    if not flag(resume, "resume"):
        return True
    path = resume_checkpoint(ckpt_dir)
    checkpoint = read_training_checkpoint(path)
    refuse_changed(path, checkpoint, settings)
    trainer = checkpoint["trainer"]  # ignite's state: iteration and epoch_length (or epoch)
    epoch = trainer.get("epoch", trainer.get("iteration", 0) // max(trainer.get("epoch_length") or 1, 1))
    refuse_finished(path, epoch, epochs)
    return True


def refuse_changed(path: str | os.PathLike, checkpoint: Mapping[str, Any], ours: Mapping[str, Any]) -> None:
    changed = changed_settings(saved_settings(checkpoint), ours)
    if changed:
        raise UsageError(
            f"{path}: this run was trained with {', '.join(changed)}; resume with that run's values, or start a new "
            "run in another --ckpt_dir"
        )


def refuse_finished(path: str | os.PathLike, epoch: int | None, epochs: int | None) -> None:
    """A checkpoint at ``epoch`` >= this run's ``epochs``: ignite would start the run over."""
    if None not in (epoch, epochs) and epoch >= int(epochs):
        raise UsageError(
            f"{path}: this run already trained {epoch} epochs and --epochs is {epochs}; pass a larger --epochs to "
            "continue it (the poly schedule is stretched to it)"
        )


def _optimizer_settings(groups: list[Mapping[str, Any]]) -> dict[str, Any]:
    """An optimizer's settings by the bundle ids: of its first group (learning rate: ``initial_lr``, the
    schedule's base, else ``lr``) and of its last, the prompt's own group (one group when both decays are equal)."""
    if not groups:
        return {}
    first = groups[0]
    return {
        "learning_rate": first.get("initial_lr", first.get("lr")),
        "momentum": first.get("momentum"),
        "weight_decay": first.get("weight_decay"),
        "prompt_weight_decay": groups[-1].get("weight_decay"),
    }


def saved_settings(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The run settings a checkpoint was trained with, by the bundle ids (None: not saved, e.g. batch size in older
    checkpoints; a poly power only from a ``PolynomialLR``, alone or in a ``SequentialLR``)."""
    return _optimizer_settings(checkpoint.get("optimizer", {}).get("param_groups", [])) | {
        "poly_power": _saved_poly_power(checkpoint.get("lr_scheduler") or {}),
        "iterations_per_epoch": checkpoint.get("trainer", {}).get("epoch_length"),
        "batch_size": checkpoint.get("batch_size"),
    }


def _saved_poly_power(state: Mapping[str, Any]) -> float | None:
    """The power of the first ``PolynomialLR`` in a saved scheduler state (itself, or a ``SequentialLR``'s part)."""
    if "power" in state:
        return state["power"]
    powers = [_saved_poly_power(part or {}) for part in state.get("_schedulers") or []]
    return next((power for power in powers if power is not None), None)


def _poly_schedules(scheduler: Any) -> list[Any]:
    """The ``PolynomialLR`` schedulers of ``scheduler``: itself, or the parts of a ``SequentialLR`` such as the demo
    overlay's constant-then-poly schedule."""
    if isinstance(scheduler, torch.optim.lr_scheduler.SequentialLR):
        return [poly for part in scheduler._schedulers for poly in _poly_schedules(part)]
    return [scheduler] if isinstance(scheduler, torch.optim.lr_scheduler.PolynomialLR) else []


def run_settings(optimizer: Any, scheduler: Any, engine: Engine) -> dict[str, Any]:
    """This run's settings by the bundle ids, from its optimizer, scheduler and trainer (as :func:`saved_settings`)."""
    powers = [part.power for part in _poly_schedules(scheduler)]
    return _optimizer_settings(optimizer.param_groups if optimizer is not None else []) | {
        "poly_power": powers[0] if powers else None,
        "iterations_per_epoch": engine.state.epoch_length,
        "batch_size": _batch_size(engine),
    }


def changed_settings(saved: Mapping[str, Any], ours: Mapping[str, Any]) -> list[str]:
    """The run settings of a checkpoint (:func:`saved_settings`) that a resumed run would silently replace or mix
    with its own (``ours``, by the same ids), as ``"id saved (now ours)"``: the learning rate (the poly schedule's
    base), momentum and weight decay (the prompt group's too: ``prompt_weight_decay``), the poly power, alone or
    inside a ``SequentialLR`` (the demo overlay's; loading restores the checkpoint's), the iterations per epoch
    (ignite would count the checkpoint's iterations in epochs of the new length) and the batch size. A setting
    either side lacks (None, absent) is not compared. ``--epochs`` may change: the schedule is stretched
    (:func:`_stretch_poly_schedule`, :func:`_stretch_sequential_schedule`)."""
    changed = {
        name: (old, new) for name in saved if None not in (old := saved[name], new := ours.get(name)) and old != new
    }
    if "prompt_weight_decay" in changed and changed["prompt_weight_decay"] == changed.get("weight_decay"):
        del changed["prompt_weight_decay"]  # the prompt group follows the weight decay: said once
    return [f"{name} {old} (now {new})" for name, (old, new) in changed.items()]


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


def _schedule_lengths(scheduler: Any) -> tuple[list[int], list[int | None]] | None:
    """A ``SequentialLR``'s milestones and its schedulers' ``total_iters`` (None where one has none); None for any
    other scheduler. Read before a checkpoint is loaded, they are this run's (from its ``--epochs``)."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.SequentialLR):
        return None
    return list(scheduler._milestones), [getattr(s, "total_iters", None) for s in scheduler._schedulers]


def _stretch_sequential_schedule(scheduler: Any, ours: tuple[list[int], list[int | None]] | None, logger: Any) -> None:
    """A resumed run with another ``--epochs`` under a ``SequentialLR`` of constant learning rates then a poly
    decay (the demo overlay's): loading restored the checkpoint's milestones and poly length, so that the run would
    keep its old schedule (and one extended past it train at learning rate 0). Put back ``ours`` (this run's, read
    before loading: the milestone and the poly length follow the new ``--epochs``) and set the learning rate to the
    new schedule's value at the current epoch, as a run started with this ``--epochs`` has there; the following
    epochs then step exactly as in such a run. Another mix of schedulers is refused when its lengths changed."""
    if ours is None or _schedule_lengths(scheduler) == ours:
        return
    old = _schedule_lengths(scheduler)
    *constant, poly = scheduler._schedulers
    simple = all(isinstance(s, torch.optim.lr_scheduler.ConstantLR) and s.factor == 1.0 for s in constant)
    if not (simple and isinstance(poly, torch.optim.lr_scheduler.PolynomialLR) and len(ours[0]) == len(constant)):
        raise UsageError(
            f"this run's epochs change its SequentialLR schedule (milestones {old[0]} now {ours[0]}), which cannot be "
            "stretched; resume with the checkpoint's --epochs or start a new run in another --ckpt_dir"
        )
    milestones, lengths = ours
    scheduler._milestones = list(milestones)
    for sub, length in zip(scheduler._schedulers, lengths):
        if length is not None:
            sub.total_iters = length
    epoch, start = scheduler.last_epoch, milestones[-1]
    poly.last_epoch = max(epoch - start, 0)  # a run not yet at the new milestone has not started its poly decay
    factor = (1.0 - min(poly.last_epoch, poly.total_iters) / poly.total_iters) ** poly.power if poly.total_iters else 1
    for group, base in zip(scheduler.optimizer.param_groups, poly.base_lrs):
        group["lr"] = base * factor
    scheduler._last_lr = poly._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    logger.info(
        f"constant-then-poly learning-rate schedule stretched: milestone {old[0][-1]} -> {start}, poly length "
        f"{old[1][-1]} -> {poly.total_iters} epochs; lr {scheduler._last_lr[0]:.3g} at epoch {epoch}"
    )
