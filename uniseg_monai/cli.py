"""The ``uniseg`` command line (``python -m uniseg_monai <command>``), built with fire."""

from __future__ import annotations

import json as _json
import sys
from collections.abc import Callable
from typing import Any

import fire

from uniseg_monai.data.datalist import DatalistError
from uniseg_monai.official import OfficialCheckpointError, convert_official
from uniseg_monai.tasks import TaskError, TaskRegistry, registry_for_datalist


def _convert_official(src: str, dst: str, overwrite: bool = False) -> None:
    """Convert an official UniSeg checkpoint (.model, upstream or downstream) to this package's format.

    Args:
        src: official checkpoint: a dict with ``state_dict`` (nnU-Net v1 keys, (z, y, x) axes).
        dst: output ``.pt``: {"model": state dict, "network_def": MONAI bundle config of the network}.
        overwrite: replace ``dst`` if it exists (otherwise an existing file is never touched).
    """
    report = convert_official(src, dst, overwrite=overwrite)
    print(_json.dumps(report, indent=2))


def _tasks(json: bool = False, datalist: str | None = None) -> None:
    """Print the task registry as a table or JSON; with --datalist, the tasks that datalist uses."""
    registry = registry_for_datalist(datalist) if datalist else TaskRegistry()
    print(_json.dumps(registry.to_json(), indent=2) if json else registry.table())


def _prepare(source: str, task: str, out: str, format: str = "msd", val_fraction: float = 0.2) -> None:
    """Add an MSD (--format msd) or nnU-Net-raw (--format nnunet) folder to a datalist as TASK (merging)."""
    from uniseg_monai.data.prepare import prepare

    counts = prepare(source, task, out, fmt=format, val_fraction=val_fraction)
    print(f"{out}: task {task!r}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))


def _generate_phantoms(out: str, seed: int = 0) -> None:
    """Write the deterministic synthetic multi-task data set (the demo's default data) and its datalist."""
    from uniseg_monai.data.phantoms import generate_phantoms

    print(generate_phantoms(out, seed=seed))


def _check_data(datalist: str) -> None:
    """Check a datalist and every file it names; print each problem with its fix; exit 1 if any."""
    from uniseg_monai.data.check import check_datalist

    problems = check_datalist(datalist)
    for problem in problems:
        print(f"ERROR {problem}")
    if problems:
        print(f"{len(problems)} problem(s) found in {datalist}")
        sys.exit(1)
    print(f"{datalist}: no problems found")


def _demo(out: str = "demo_output", bundle: str = "bundles/uniseg_pretrain") -> None:
    """Train, evaluate and apply the pretrain bundle on the phantom data in OUT (what `make demo` runs)."""
    from uniseg_monai.demo import run_demo

    run_demo(out, bundle)


COMMANDS: dict[str, Callable[..., Any]] = {
    "convert-official": _convert_official,
    "tasks": _tasks,
    "prepare": _prepare,
    "generate-phantoms": _generate_phantoms,
    "check-data": _check_data,
    "demo": _demo,
}

USER_ERRORS = (OfficialCheckpointError, DatalistError, TaskError, FileExistsError, FileNotFoundError, ValueError)


def main(argv: list[str] | None = None) -> None:
    """Run one ``uniseg`` command; user errors print one line and exit with status 2."""
    try:
        fire.Fire(COMMANDS, command=argv, name="uniseg")
    except USER_ERRORS as err:
        print(f"uniseg: error: {err}", file=sys.stderr)
        sys.exit(2)
