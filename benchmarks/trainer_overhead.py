"""What the bundle's training loop costs on top of the network: iterations/s of the pretrain bundle's
``SupervisedTrainer`` (built from ``train.json`` + ``demo.json`` on the phantom data) against the bare step on the
same batches (forward, Dice+CE with deep supervision, backward, gradient clipping, optimiser step), and where the
difference goes, found by switching parts off one at a time:

- data loading: the DataLoader (crop from the cache, collation, workers) replaced by the batches of its first
  epoch, collected beforehand (the same tasks and crops);
- MetaTensor: those batches as plain tensors;
- handlers: only gradient clipping kept (no non-finite guard, progress bar, stats, TensorBoard, LR schedule,
  checkpoints);
- engine: what remains (ignite's loop, ``prepare_batch``, inferer, ``TaskLogits``);
- deep-supervision targets: the loss's nearest-neighbour downsampling of the label, timed alone (inside the bare step).

Every variant runs ``--epochs`` x ``--iterations`` iterations per round (the first 2 are warm-up), the rounds
alternate the variants, and the medians of the per-round ratios to the bare step are printed. Validation is off.
``--cpu_time`` counts this process's CPU time instead of wall time: steadier on a shared machine, and complete with
``num_workers`` 0, where all the work happens in this process.

    python benchmarks/trainer_overhead.py                        # demo settings (num_workers 0), ~3 min on CPU
    python benchmarks/trainer_overhead.py --num_workers 4        # train.json's default workers
    python benchmarks/trainer_overhead.py --cpu_time             # on a busy machine
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.utils import set_determinism

from uniseg_monai.data.phantoms import generate_phantoms
from uniseg_monai.networks import TaskLogits

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "uniseg_pretrain" / "configs"
clock = time.perf_counter


def bundle(data: Path, run: Path, ids: dict, **objects) -> ConfigParser:
    """The bundle's config on ``data``, writing into ``run``; ``objects`` are names its expressions can use."""
    parser = ConfigParser(globals=objects)
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "demo.json")])
    parser.update({"bundle_root": str(CONFIGS.parent), "dataset_dir": str(data), "ckpt_dir": str(run / "models"),
                   "output_dir": str(run / "eval"), **ids})  # fmt: skip
    return parser


def first_epoch(parser: ConfigParser) -> list[dict]:
    """The batches of the bundle's DataLoader in its first epoch."""
    set_determinism(seed=0)
    return list(parser.get_parsed_content("train#dataloader"))


def plain(batches: list[dict]) -> list[dict]:
    return [{k: v.as_tensor() if isinstance(v, MetaTensor) else v for k, v in b.items()} for b in batches]


def trainer_seconds(
    make: Callable[..., ConfigParser], batches: list[dict] | None, handlers: bool, data: list[float] | None = None
) -> float:
    """Seconds per iteration of the bundle's trainer after 2 warm-up iterations, epoch ends included; ``batches``
    replace the DataLoader, ``handlers=False`` keeps only gradient clipping (and no checkpoints). ``data`` gets the
    seconds per iteration spent fetching batches (timed directly, steadier than a difference of two runs)."""
    parser = make(batches=batches)
    if batches is not None:
        parser["train#trainer#train_data_loader"] = "$batches"
    if not handlers:
        parser["train#trainer#train_handlers"] = [{"_target_": "uniseg_monai.engine.handlers.GradientClipping",
                                                   "max_norm": "@grad_clip"}]  # fmt: skip
    set_determinism(seed=0)
    trainer = parser.get_parsed_content("train#trainer")
    if handlers:
        parser.get_parsed_content("train#checkpoint_saver").attach(trainer)
    marks = {"fetching": 0.0}

    def fetched(engine) -> None:  # the batch of iteration state.iteration + 1
        if engine.state.iteration >= 2:
            marks["fetching"] += clock() - marks["fetch"]

    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=2), lambda: marks.setdefault("start", clock()))
    trainer.add_event_handler(Events.GET_BATCH_STARTED, lambda: marks.update(fetch=clock()))
    trainer.add_event_handler(Events.GET_BATCH_COMPLETED, fetched)
    trainer.run()
    if data is not None:
        data.append(marks["fetching"] / (trainer.state.iteration - 2))
    return (clock() - marks["start"]) / (trainer.state.iteration - 2)


def bare_step(parser: ConfigParser, batches: list[dict]) -> Callable[[], None]:
    """The training algorithm alone, one batch after the other: forward, loss, backward, clipping, optimiser step."""
    set_determinism(seed=0)
    network, loss_fn = parser.get_parsed_content("network"), parser.get_parsed_content("loss")
    optimizer, device = parser.get_parsed_content("optimizer"), parser.get_parsed_content("device")
    batches = [{k: batch[k].to(device) for k in ("image", "label", "task_id")} for batch in batches]
    cycle = itertools.cycle(batches)

    def step() -> None:
        batch = next(cycle)
        image, label, task_id = batch["image"], batch["label"], batch["task_id"]
        network.train()
        optimizer.zero_grad(set_to_none=False)  # as MONAI's trainer
        loss = loss_fn(TaskLogits(network(image, task_id=task_id), task_id), label)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), parser["grad_clip"])
        optimizer.step()

    return step


def bare_seconds(step: Callable[[], None], iterations: int) -> float:
    for _ in range(2):
        step()
    start = clock()
    for _ in range(iterations - 2):
        step()
    return (clock() - start) / (iterations - 2)


def target_seconds(parser: ConfigParser, batches: list[dict]) -> float:
    """The deep-supervision targets of one step: the label downsampled (nearest) to every lower output."""
    network = parser.get_parsed_content("network_def").train()
    with torch.no_grad():
        sizes = [o.shape[2:] for o in network(batches[0]["image"], task_id=batches[0]["task_id"])[1:]]
    start = clock()
    for batch in batches:
        [F.interpolate(batch["label"].float(), size=s, mode="nearest-exact") for s in sizes]
    return (clock() - start) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="phantom folder with datalist.json (default: made in a temp dir)")
    parser.add_argument("--num_workers", type=int, default=None, help="default: the bundle's (demo.json: 0)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=20, help="iterations per epoch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpu_time", action="store_true", help="this process's CPU time instead of wall time")
    args = parser.parse_args()
    global clock
    clock = time.process_time if args.cpu_time else time.perf_counter
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or generate_phantoms(Path(tmp) / "data").parent
        ids = {"epochs": args.epochs, "iterations_per_epoch": args.iterations, "val_interval": 10**6}
        if args.num_workers is not None:
            ids["num_workers"] = args.num_workers
        make = lambda **objects: bundle(data, Path(tempfile.mkdtemp(dir=tmp)), ids, **objects)  # noqa: E731
        batches = first_epoch(make())
        step = bare_step(make(), plain(batches))
        variants = {
            "bundle trainer": lambda: trainer_seconds(make, None, True, fetching),
            "- data loading": lambda: trainer_seconds(make, batches, True),
            "- MetaTensor": lambda: trainer_seconds(make, plain(batches), True),
            "- handlers": lambda: trainer_seconds(make, plain(batches), False),
            "bare step": lambda: bare_seconds(step, args.epochs * args.iterations),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        fetching: list[float] = []
        names = list(variants)
        logging.disable(logging.INFO)  # the trainer's log lines and progress bars
        with contextlib.redirect_stderr(io.StringIO()):
            for r in range(args.rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    times[name].append(variants[name]())
        targets = target_seconds(make(), plain(batches))
        workers, patch = make()["num_workers"], make()["patch_size"]
    bare = times["bare step"]
    ratio = {name: statistics.median(t / b for t, b in zip(times[name], bare)) for name in names}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, num_workers {workers}, batch "
          f"{len(batches[0]['image'])} x patch {patch}, {args.epochs} x {args.iterations} iterations, "
          f"{args.rounds} rounds, {'CPU' if args.cpu_time else 'wall'} time")  # fmt: skip
    print(f"\n{'variant':<16}{'s/it':>8}{'it/s':>8}{'vs bare':>9}   (each row: the one above with a part off)")
    for name in names:
        seconds = statistics.median(times[name])
        print(f"{name:<16}{seconds:>8.3f}{1 / seconds:>8.2f}{ratio[name]:>9.3f}")
    parts = {"data loading": ratio["bundle trainer"] - ratio["- data loading"],
             "MetaTensor": ratio["- data loading"] - ratio["- MetaTensor"],
             "handlers": ratio["- MetaTensor"] - ratio["- handlers"], "engine": ratio["- handlers"] - 1}  # fmt: skip
    print(f"\ntrainer overhead vs the bare step: {100 * (ratio['bundle trainer'] - 1):+.1f} %, of which")
    for part, share in parts.items():
        print(f"  {part:<14}{100 * share:+6.1f} %")
    share = 100 * statistics.median(f / b for f, b in zip(fetching, bare))
    print(f"data loading timed directly in the bundle trainer: {1e3 * statistics.median(fetching):.1f} ms/it = "
          f"{share:.1f} % of the bare step")  # fmt: skip
    share = 100 * targets / statistics.median(bare)
    print(f"deep-supervision targets (inside both): {1e3 * targets:.2f} ms/it = {share:.1f} % of the bare step")


if __name__ == "__main__":
    main()
