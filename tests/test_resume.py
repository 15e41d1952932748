"""A resumed training run ends with exactly the weights of an uninterrupted one (issue 15): the sampler's epoch, the
random states (torch, numpy, python, every random transform's) and the best-model tracking travel in the
checkpoint; a run killed with SIGKILL mid-epoch restarts from the previous epoch's end. Also: the first log line of
a resumed run, old checkpoints, keep_checkpoints, file modes. The uniseg_pretrain bundle with tiny settings."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import integration
from ignite.engine import Engine, Events
from monai.bundle import ConfigWorkflow
from monai.transforms import Compose, RandFlipd, RandZoomd

from uniseg_monai.core.errors import UsageError, user_error
from uniseg_monai.engine.checkpoints import (
    ModelCheckpointSaver,
    ResumeCheckpointLoader,
    prune_checkpoints,
    trainer_entries,
)
from uniseg_monai.engine.random_states import RandomStates
from uniseg_monai.networks import UniSeg, nnunet_features
from uniseg_monai.tasks import TaskRegistry

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "uniseg_pretrain"
CONFIGS = BUNDLE / "configs"
TINY = {"patch_size": [64, 64, 32], "base_features": 4, "iterations_per_epoch": 2, "val_interval": 1,
        "sw_batch_size": 2, "cache_rate": 0.0}  # fmt: skip
TRAINER_LOGGER = "ignite.engine.engine.SupervisedTrainer"


def settings(phantoms: Path, root: Path, **extra) -> dict:
    """The workflow arguments of a tiny training run in ``root`` (its models/ and eval/ folders)."""
    return {
        "config_file": [str(CONFIGS / "train.json")],
        "meta_file": str(CONFIGS / "metadata.json"),
        "logging_file": str(CONFIGS / "logging.conf"),
        "workflow_type": "train",
        "bundle_root": str(BUNDLE),
        "dataset_dir": str(phantoms.parent),
        "ckpt_dir": str(root / "models"),
        "output_dir": str(root / "eval"),
        **TINY,
        **extra,
    }


class Lines(logging.Handler):
    """The trainer's log messages."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def build(wf: ConfigWorkflow) -> None:
    """Build the run's objects in the order its ``run`` expression does (saver, then trainer): the network's
    initialisation and the DataLoaders' seeding of the transforms draw from one generator, so the order matters."""
    wf.parser.get_parsed_content("train#checkpoint_saver")


def train(phantoms: Path, root: Path, stop_after: int = 0, built=None, **extra) -> tuple[ConfigWorkflow, list[str]]:
    """Run the training workflow (``stop_after`` N: interrupted at the end of epoch N, once its checkpoint is
    written; ``built``: called with the workflow once its objects are built, before the run); returns it and the
    trainer's log messages from its construction on."""
    wf = ConfigWorkflow(**settings(phantoms, root, **extra))
    lines = Lines()
    logger = logging.getLogger(TRAINER_LOGGER)
    logger.addHandler(lines)
    try:
        wf.initialize()
        build(wf)
        if built is not None:
            built(wf)
        if stop_after:
            trainer = wf.parser.get_parsed_content("train#trainer")
            trainer.add_event_handler(Events.EPOCH_COMPLETED(once=stop_after), lambda engine: engine.terminate())
        wf.run()
        wf.finalize()
    finally:
        logger.removeHandler(lines)
    return wf, lines.messages


def checkpoints(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "models").glob("checkpoint_epoch=*.pt"))


def max_abs_diff(a: Path, b: Path, entry: str = "model") -> float:
    """The largest absolute difference between the tensors of ``entry`` in two files (same keys and shapes)."""
    x, y = (torch.load(p, weights_only=True)[entry] for p in (a, b))
    x, y = (dict(_tensors(v)) for v in (x, y))
    assert x.keys() == y.keys() and x
    return max(float((x[k].double() - y[k].double()).abs().max()) if x[k].numel() else 0.0 for k in x)


def _tensors(obj, prefix=""):
    """(path, tensor) of every tensor in a nested state dict (an optimizer's state included)."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def assert_same_run(root: Path, reference: Path, epoch: int = 3) -> None:
    final = f"checkpoint_epoch={epoch}.pt"
    for name, entry in ((final, "model"), (final, "optimizer"), ("model.pt", "model")):
        diff = max_abs_diff(root / "models" / name, reference / "models" / name, entry)
        assert diff == 0, f"{name} {entry}: max abs difference {diff}"
    ours, theirs = (torch.load(r / "models" / final, weights_only=True) for r in (root, reference))
    assert ours["best_model"] == theirs["best_model"] and ours["sampler"] == theirs["sampler"] == {"epoch": epoch}


@pytest.fixture(scope="module")
@integration
def reference(phantoms, tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch run (in-process, num_workers 0)."""
    root = tmp_path_factory.mktemp("reference")
    train(phantoms, root, epochs=3, num_workers=0)
    return root


@pytest.fixture(scope="module")
@integration
def first_epoch(phantoms, tmp_path_factory) -> Path:
    """The same run interrupted after its first epoch, to be resumed by copies (num_workers 0). Not a 1-epoch run:
    the learning rate schedule depends on ``epochs``."""
    root = tmp_path_factory.mktemp("first_epoch")
    train(phantoms, root, stop_after=1, epochs=3, num_workers=0)
    assert checkpoints(root) == ["checkpoint_epoch=1.pt"]
    return root


@pytest.fixture(scope="module")
def resumed(phantoms, first_epoch, tmp_path_factory) -> tuple[Path, list[str], dict]:
    """The first epoch resumed to 3 epochs under umask 022; returns the run folder, the trainer's log and the
    best-model tracking (model.pt's saver) as it was when the run started."""
    root = tmp_path_factory.mktemp("resumed") / "run"
    shutil.copytree(first_epoch, root)
    best = {}

    def record_best(wf: ConfigWorkflow) -> None:
        best.update(wf.parser.get_parsed_content("validate#model_saver").state_dict())

    umask = os.umask(0o022)
    try:
        _, lines = train(phantoms, root, epochs=3, num_workers=0, resume=True, built=record_best)
    finally:
        os.umask(umask)
    return root, lines, best


@pytest.mark.exactness
def test_resume_at_an_epoch_end_gives_the_uninterrupted_weights(resumed, reference, first_epoch):
    assert_same_run(resumed[0], reference)
    # the best score so far decides whether a validation replaces model.pt: restored, not restarted
    saved = torch.load(first_epoch / "models" / "checkpoint_epoch=1.pt", weights_only=True)["best_model"]
    assert resumed[2] == saved and saved["best_metric_epoch"] == 1 and len(saved["saved"]) == 1


def test_a_resumed_run_keeps_the_last_checkpoints_only(resumed, reference):
    # the resumed run also deletes checkpoint_epoch=1.pt, which the first run wrote
    assert checkpoints(resumed[0]) == checkpoints(reference) == ["checkpoint_epoch=2.pt", "checkpoint_epoch=3.pt"]
    assert sorted(p.name for p in (resumed[0] / "models").iterdir()) == [
        "checkpoint_epoch=2.pt", "checkpoint_epoch=3.pt", "model.pt", "tasks.json"]  # fmt: skip


def test_the_log_of_a_resumed_run_names_where_it_continues(resumed):
    lines = resumed[1]
    restored = "model, optimizer, lr_scheduler, sampler, random_states, best_model, trainer, grad_scaler, gradient"
    assert lines[0].startswith(f"Restored {restored}_buffers from ")
    assert lines[0].endswith("checkpoint_epoch=1.pt: iteration 2, epoch 1")
    engine_run = next(m for m in lines if m.startswith("Engine run"))
    assert engine_run == "Engine run resuming from iteration 2, epoch 1 until 3 epochs"  # was "iteration 0, epoch 0"


def test_checkpoints_follow_the_umask(resumed):
    for name in ("checkpoint_epoch=3.pt", "model.pt"):
        assert stat.S_IMODE((resumed[0] / "models" / name).stat().st_mode) == 0o644, name


def test_an_old_checkpoint_still_resumes_inexactly_with_a_warning(phantoms, first_epoch, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(first_epoch, root)
    path = root / "models" / "checkpoint_epoch=1.pt"
    old = torch.load(path, weights_only=True)
    for key in ("sampler", "random_states", "best_model", "grad_scaler", "gradient_buffers", "batch_size"):
        del old[key]
    torch.save(old, path)
    wf, lines = train(phantoms, root, epochs=2, num_workers=0, resume=True)
    warning = next(m for m in lines if "not be exactly" in m)
    assert "sampler, random_states, best_model, grad_scaler, gradient_buffers were saved" in warning
    assert wf.parser.get_parsed_content("train#sampler").epoch == 2  # continued at epoch 1, did not replay epoch 0
    assert checkpoints(root) == ["checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt"]


def refused_before_data(phantoms: Path, root: Path, **extra) -> str:
    """The one-line refusal of a ``--resume true`` run with ``extra`` settings, raised by the run's ``initialize``
    (engine.checkpoints.check_resume), i.e. before any data is read or cached: its datalist's images do not exist,
    which the later header checks would refuse instead."""
    gone = root.parent / "gone"
    datalist = json.loads(phantoms.read_text())
    for section in ("training", "validation", "testing"):
        datalist[section] = [
            {**item, "image": f"missing/{i}.nii.gz"} for i, item in enumerate(datalist.get(section, []))
        ]
    gone.mkdir(exist_ok=True)
    (gone / "datalist.json").write_text(json.dumps(datalist))
    wf = ConfigWorkflow(**settings(gone / "datalist.json", root, resume=True, num_workers=0, **extra))
    with pytest.raises(Exception) as refused:
        wf.initialize()
    return str(user_error(refused.value))


def refused_by_loader(phantoms: Path, root: Path, **extra) -> str:
    """The refusal of the trainer's ResumeCheckpointLoader itself, in a run built without its ``initialize`` checks
    (as a script using the bundle's objects would)."""
    wf = ConfigWorkflow(**settings(phantoms, root, resume=True, num_workers=0, **extra))
    wf.parser.parse(reset=True)
    with pytest.raises(Exception) as refused:
        build(wf)
    return str(user_error(refused.value))


def test_resuming_a_finished_run_is_refused(phantoms, first_epoch, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(first_epoch, root)
    assert "already trained 1 epochs and --epochs is 1" in refused_before_data(phantoms, root, epochs=1)
    assert "already trained 1 epochs and --epochs is 1" in refused_by_loader(phantoms, root, epochs=1)
    assert checkpoints(root) == ["checkpoint_epoch=1.pt"]


def test_resuming_with_another_learning_rate_epoch_length_batch_size_or_prompt_decay_is_refused(
    phantoms, first_epoch, tmp_path
):
    root = tmp_path / "run"
    shutil.copytree(first_epoch, root)
    message = refused_before_data(phantoms, root, epochs=3, learning_rate=0.02, iterations_per_epoch=3)
    assert "trained with learning_rate 0.01 (now 0.02), iterations_per_epoch 2 (now 3); resume with" in message
    saved = torch.load(root / "models" / "checkpoint_epoch=1.pt", weights_only=True)["batch_size"]
    message = refused_before_data(phantoms, root, epochs=3, batch_size=saved + 1)
    assert f"trained with batch_size {saved} (now {saved + 1}); resume with" in message
    message = refused_before_data(phantoms, root, epochs=3, prompt_weight_decay=0.0)  # the prompt's own group
    assert "trained with prompt_weight_decay 3e-05 (now 0.0); resume with" in message
    for change, shown in (({"momentum": 0.9}, "momentum 0.99 (now 0.9)"), ({"poly_power": 2.0}, "poly_power 0.9")):
        assert f"trained with {shown}" in refused_before_data(phantoms, root, epochs=3, **change)
    message = refused_by_loader(phantoms, root, epochs=3, learning_rate=0.02)  # from the objects it restores into
    assert "trained with learning_rate 0.01 (now 0.02); resume with" in message
    assert checkpoints(root) == ["checkpoint_epoch=1.pt"]


KILLED_RUN = """
import json, os, signal, sys
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

torch.set_num_threads(1)  # as the tests' process: the same arithmetic
args = json.loads(sys.argv[1])
wf = ConfigWorkflow(**args["workflow"])
wf.initialize()
wf.parser.get_parsed_content("train#checkpoint_saver")  # the order of the run expression, as train() in the tests
trainer = wf.parser.get_parsed_content("train#trainer")
trainer.add_event_handler(
    Events.ITERATION_COMPLETED(once=args["kill_at"]), lambda engine: os.kill(os.getpid(), signal.SIGKILL)
)
wf.run()
"""


@pytest.mark.integration
def test_kill_9_mid_epoch_with_workers_then_resume_gives_the_uninterrupted_weights(phantoms, tmp_path):
    """num_workers 2: the workers' transforms are seeded from the torch generator when each epoch starts."""
    reference = tmp_path / "reference"
    train(phantoms, reference, epochs=3, num_workers=2)

    root = tmp_path / "killed"
    args = {"workflow": settings(phantoms, root, epochs=3, num_workers=2), "kill_at": 3}  # 1st iteration of epoch 2
    log = tmp_path / "killed.log"
    with log.open("w") as out:  # a file, not a pipe: orphaned workers would hold a pipe open
        command = [sys.executable, "-c", KILLED_RUN, json.dumps(args)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=300)
    assert done.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert checkpoints(root) == ["checkpoint_epoch=1.pt"]  # killed inside epoch 2, before its checkpoint

    _, lines = train(phantoms, root, epochs=3, num_workers=2, resume=True)
    assert next(m for m in lines if m.startswith("Engine run")).startswith("Engine run resuming from iteration 2, ")
    assert_same_run(root, reference)


def test_random_states_round_trip_through_a_weights_only_file(tmp_path):
    transform = Compose([RandFlipd("image", prob=0.5), RandZoomd("image", prob=0.5, min_zoom=0.7, max_zoom=1.4)])
    transform.set_random_state(seed=3)
    states = RandomStates(transform)
    assert [type(t).__name__ for t in states.transforms()] == ["Compose", "RandFlipd", "RandZoomd", "RandZoom"]
    torch.save(states.state_dict(), tmp_path / "states.pt")

    def draws() -> list:
        global_numpy = np.random.rand(3).tolist()  # noqa: NPY002 - the global generator is what is saved
        return [torch.rand(3).tolist(), global_numpy, random.random(), [t.R.rand() for t in states.transforms()]]

    expected = draws()
    states.load_state_dict(torch.load(tmp_path / "states.pt", weights_only=True))
    assert draws() == expected


def test_grad_scaler_state_is_restored_when_the_run_starts():
    saved = Engine(lambda engine, batch: None)
    saved.scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    state = trainer_entries(saved, torch.nn.Linear(1, 1))["grad_scaler"].state_dict()
    resumed = Engine(lambda engine, batch: None)
    trainer_entries(resumed, torch.nn.Linear(1, 1))["grad_scaler"].load_state_dict(state)
    resumed.scaler = torch.amp.GradScaler("cpu")  # SupervisedTrainer.run makes a new one before the run starts
    resumed.run([0])
    assert resumed.scaler.get_scale() == 8.0


def test_gradient_buffers_are_recreated_as_zeros():
    network = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    network[0].weight.grad = torch.ones(2, 2)
    names = trainer_entries(Engine(lambda e, b: None), network)["gradient_buffers"].state_dict()
    assert names == ["0.weight"]
    fresh = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    trainer_entries(Engine(lambda e, b: None), fresh)["gradient_buffers"].load_state_dict(names)
    assert torch.equal(fresh[0].weight.grad, torch.zeros(2, 2)) and fresh[0].bias.grad is None


def test_prune_keeps_the_newest_checkpoints_and_nothing_else(tmp_path):
    names = [f"checkpoint_epoch={n}.pt" for n in (1, 2, 10, 9)] + ["model.pt", "pretrained.pt", "checkpoint_epoch=x.pt"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    deleted = prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in deleted) == ["checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])
    with pytest.raises(UsageError, match="keep_checkpoints"):
        ModelCheckpointSaver(str(tmp_path), {"model": torch.nn.Linear(1, 1)}, TaskRegistry(), keep_checkpoints=0)


def test_resuming_with_other_network_settings_names_the_field_and_the_option(tmp_path):
    """The resume loader explains a network that does not fit the checkpoint as a model file does
    (``model_files.mismatch``): the ``network_def`` field that differs and the option that restores it."""
    arch = {"num_tasks": 2, "num_classes": 3, "patch_size": (32, 32, 16), "kernel_sizes": [3] * 3, "strides": [1, 2, 2]}
    trained = UniSeg(features=nnunet_features(4, num_stages=3), **arch)
    checkpoint = {"model": trained.state_dict(), "trainer": {}, "network_def": trained.network_def()}
    torch.save(checkpoint, tmp_path / "checkpoint_epoch=1.pt")
    wider = UniSeg(features=nnunet_features(8, num_stages=3), **arch)
    loader = ResumeCheckpointLoader(tmp_path, True, {"model": wider})
    with pytest.raises(UsageError, match=r"epoch=1.pt: was trained with other settings \(features: file \[4, 8, 16\] "
                       r"vs config \[8, 16, 32\]: pass --base_features 4\)"):  # fmt: skip
        loader(Engine(lambda engine, batch: None))


def demo_schedule(
    epochs: int, poly_power: float | None = None
) -> tuple[torch.nn.Linear, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """A tiny network with the demo overlay's optimiser and constant-then-poly ``SequentialLR`` for ``epochs``
    (train.json + demo.json, only the parameters replaced; ``poly_power`` as ``--poly_power``)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "demo.json")])
    network = torch.nn.Linear(2, 1)
    parser["optimizer_params"], parser["epochs"] = "$[torch.nn.Parameter(torch.ones(3))]", epochs
    if poly_power is not None:
        parser["poly_power"] = poly_power
    optimizer = parser.get_parsed_content("optimizer")
    optimizer.param_groups[0]["params"] = list(network.parameters())
    return network, optimizer, parser.get_parsed_content("lr_scheduler", instantiate=True)


def lrs(optimizer, scheduler, steps: int) -> list[float]:
    """The learning rate of the next ``steps`` epochs (the bundle steps the schedule once per epoch)."""
    found = []
    for _ in range(steps):
        found.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    return found


@pytest.mark.parametrize("stop", [3, 7])  # before / after the saved run's milestone (5 of 10 epochs)
def test_a_larger_epochs_stretches_the_demo_constant_then_poly_schedule(stop, tmp_path):
    _, optimizer, scheduler = demo_schedule(20)
    uninterrupted = lrs(optimizer, scheduler, 20)
    network, optimizer, scheduler = demo_schedule(10)
    lrs(optimizer, scheduler, stop)
    engine = Engine(lambda engine, batch: None)
    engine.state.max_epochs, engine.state.epoch_length, engine.state.iteration = 10, 4, 4 * stop
    saved = {"model": network, "optimizer": optimizer, "lr_scheduler": scheduler, "trainer": engine}
    torch.save({k: v.state_dict() for k, v in saved.items()}, tmp_path / f"checkpoint_epoch={stop}.pt")
    network, optimizer, scheduler = demo_schedule(20)  # resumed with --epochs 20
    engine.state.max_epochs = 20
    load = {"model": network, "optimizer": optimizer, "lr_scheduler": scheduler}
    ResumeCheckpointLoader(tmp_path, True, load).attach(engine)
    assert engine.state.epoch == stop and scheduler._milestones == [10] and scheduler._schedulers[1].total_iters == 10
    assert lrs(optimizer, scheduler, 20 - stop) == pytest.approx(uninterrupted[stop:], rel=1e-9, abs=1e-12)
    assert uninterrupted[-1] > 0 and uninterrupted[9] == uninterrupted[0]  # constant for 10 epochs, then decays


def _checkpoint_after_3_of_10_epochs(network, optimizer, scheduler, folder: Path) -> Engine:
    """Step ``scheduler`` 3 epochs and save what a trainer saves then (4 iterations per epoch, 10 epochs planned) as
    ``folder/checkpoint_epoch=3.pt``; the trainer engine, for a resume to attach to."""
    lrs(optimizer, scheduler, 3)
    engine = Engine(lambda engine, batch: None)
    engine.state.max_epochs, engine.state.epoch_length, engine.state.iteration = 10, 4, 12
    saved = {"model": network, "optimizer": optimizer, "lr_scheduler": scheduler, "trainer": engine}
    torch.save({k: v.state_dict() for k, v in saved.items()}, folder / "checkpoint_epoch=3.pt")
    return engine


def test_resuming_the_demo_schedule_with_another_poly_power_is_refused(tmp_path):
    engine = _checkpoint_after_3_of_10_epochs(*demo_schedule(10), tmp_path)
    network, optimizer, scheduler = demo_schedule(10, poly_power=2.0)
    load = {"model": network, "optimizer": optimizer, "lr_scheduler": scheduler}
    with pytest.raises(UsageError, match=r"trained with poly_power 0.9 \(now 2.0\); resume with"):
        ResumeCheckpointLoader(tmp_path, True, load).attach(engine)
    assert scheduler._schedulers[1].power == 2.0  # refused before loading: nothing restored


def test_a_sequential_schedule_that_cannot_be_stretched_is_refused(tmp_path):
    def make(epochs):
        network = torch.nn.Linear(2, 1)
        optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
        parts = [
            torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0, 0),
            torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.9),
        ]
        return network, optimizer, torch.optim.lr_scheduler.SequentialLR(optimizer, parts, [epochs // 2])

    engine = _checkpoint_after_3_of_10_epochs(*make(10), tmp_path)
    network, optimizer, scheduler = make(20)
    engine.state.max_epochs = 20
    with pytest.raises(UsageError, match=r"milestones \[5\] now \[10\].*resume with the checkpoint's --epochs"):
        ResumeCheckpointLoader(
            tmp_path, True, {"model": network, "optimizer": optimizer, "lr_scheduler": scheduler}
        ).attach(engine)
