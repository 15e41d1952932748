"""Side-by-side training runs in parallel processes, for ``uniseg ablate`` and ``uniseg transfer`` (and the demo's
fine-tuning pair): seeds from the command line, each run in a spawned process with its share of the cores and its
console in its own log, failures as one line per run, and mean ± sd over seeds."""

from __future__ import annotations

import multiprocessing
import os
import sys
import traceback
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from uniseg_monai.core.errors import UniSegError, UsageError, one_line
from uniseg_monai.core.locks import owned
from uniseg_monai.core.progress import progress_bar


def seed_list(seeds: int | str | Sequence[int]) -> list[int]:
    """``--seeds``: a count N (seeds 0..N-1) or the seeds themselves (a list, or ``"0,4,7"``)."""
    if isinstance(seeds, str):
        seeds = int(seeds) if seeds.strip().isdigit() else seeds.split(",")
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        found = list(range(seeds))
    elif isinstance(seeds, Sequence) and all(str(s).strip().isdigit() for s in seeds):
        found = [int(s) for s in seeds]
    else:
        found = []
    if not found or len(set(found)) != len(found):
        raise UsageError(f"--seeds takes a count (3: seeds 0, 1, 2) or distinct seeds >= 0 ([0,4,7]), got {seeds!r}")
    return found


def whole_numbers(**options: object) -> None:
    """Refuse an option given (not None) that is not a whole number >= 1 (one line naming it, ``--`` spelled)."""
    for name, value in options.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"--{name} takes a whole number, got {value!r}")
        if value < 1:
            raise UsageError(f"--{name} must be >= 1, got {value}")


@contextmanager
def console(path: Path) -> Iterator[None]:
    """This process's stdout and stderr (file descriptors 1 and 2, so the bundle's logging and progress bars too)
    appended to ``path`` inside the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = []
    with path.open("a") as log:
        for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
            stream.flush()
            saved.append(os.dup(fd))
            os.dup2(log.fileno(), fd)
        try:
            yield
        finally:
            for fd, stream, old in zip((1, 2), (sys.stdout, sys.stderr), saved, strict=True):
                stream.flush()
                os.dup2(old, fd)
                os.close(old)


@contextmanager
def study_folder(out: Path, what: str) -> Iterator[Path]:
    """``--out`` of ``uniseg ablate`` / ``transfer`` owned (:func:`~uniseg_monai.core.locks.owned`) for the whole
    command: a second command into it is refused before any of its runs starts (so it never writes into this one's
    run logs), naming this one's pid; a file given as ``--out`` is refused in one line."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, but it must be a folder: give a new folder, or an earlier study's")
    with owned(out, what):
        yield out


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _set_threads(threads: int) -> None:
    """A worker's torch threads (its share of the cores)."""
    torch.set_num_threads(threads)


def _work(target: Callable[..., dict], run: Path, **arguments) -> dict:
    """``target(run=run, **arguments)`` in a worker process, its console in ``run/console.log``; a failure becomes
    ``{"error": one line}`` (the traceback goes to the log)."""
    with console(run / "console.log"):
        try:
            return target(run=run, **arguments)
        except KeyboardInterrupt:  # Ctrl-C reaches every process: this worker ends rather than start a queued run
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        except Exception as err:  # reported per run; the other runs go on
            traceback.print_exc()
            return {"error": f"{type(err).__name__}: {one_line(err)}"}


def execute(target: Callable[..., dict], runs: dict[Hashable, dict], jobs: int) -> Iterator[tuple[Hashable, dict]]:
    """``target`` (a module-level function taking ``run`` = the run folder and the other arguments of each run) for
    each run in ``jobs`` spawned processes of ``cores // jobs`` torch threads each, as they finish: key, result or
    ``{"error": ...}``."""
    threads = max(1, cores() // jobs)
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_set_threads, initargs=(threads,))
    try:
        futures = {pool.submit(_work, target, **arguments): key for key, arguments in runs.items()}
        for future in as_completed(futures):
            try:
                yield futures[future], future.result()
            except Exception as err:  # the worker process died (killed, out of memory)
                yield futures[future], {"error": f"{type(err).__name__}: {one_line(err)}"}
    finally:  # also on Ctrl-C: the runs not started yet never start
        pool.shutdown(cancel_futures=True)


def run_all(
    target: Callable[..., dict], todo: dict[tuple[str, int], dict], jobs: int | None, command: str, logs: str
) -> tuple[dict, dict]:
    """:func:`execute` the runs keyed (name, seed) with a progress bar, each failure in one line as it happens
    (``command``: the prefix of the lines, ``logs``: where the run logs lie); results and errors by key."""
    results, failed = {}, {}
    jobs = int(jobs or min(cores(), len(todo)))
    print(f"{command}: {len(todo)} run(s), {jobs} at a time; logs in {logs}")
    with progress_bar(total=len(todo), desc=command, unit="run") as bar:
        for (name, seed), result in execute(target, todo, jobs):
            if "error" in result:
                failed[name, seed] = result["error"]
                bar.write(f"{command}: {name} seed {seed} failed: {result['error']}")
            else:
                results[name, seed] = result
            bar.update()
    return results, failed


def failed_runs(failed: dict[tuple[str, int], str], logs: str, total: int | None = None) -> UniSegError:
    """What a command ends with when some of its runs (keyed (name, seed)) failed: which ones (``total``: of how
    many), where their logs lie and how to retry."""
    names = ", ".join(f"{name} seed {seed}" for name, seed in failed)
    count = f"{len(failed)} of {total}" if total else f"{len(failed)}"
    return UniSegError(
        f"{count} run(s) failed ({names}): see {logs}; run the same command again to retry them (finished runs are "
        "reused)"
    )


def stats(values: Sequence[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation (None for one value)."""
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None}


def cell(summary: dict, scale: float, decimals: int) -> str:
    """``mean ± sd`` of :func:`stats` (the mean alone for one seed)."""
    mean = f"{scale * summary['mean']:,.{decimals}f}"
    return mean if summary["sd"] is None else f"{mean} ± {scale * summary['sd']:,.{decimals}f}"
