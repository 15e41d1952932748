"""The ``uniseg`` command line (``python -m uniseg_monai <command>``), built with fire."""

from __future__ import annotations

import functools
import inspect
import json as _json
import sys
from collections.abc import Callable
from typing import Any

import fire

from uniseg_monai.apps.bundles import DEFAULT_BUNDLE
from uniseg_monai.apps.label_server import label_server
from uniseg_monai.apps.predict import predict
from uniseg_monai.apps.weights import convert_into_bundle, download_weights
from uniseg_monai.core.errors import UsageError, debugging, flag, one_line, user_error
from uniseg_monai.engine.wiring import registry_for_datalist
from uniseg_monai.model_io.model_files import convert_official
from uniseg_monai.tasks import TaskRegistry


def _convert_official(src: str, dst: str = "", bundle: str = "", task: str = "", overwrite: bool = False) -> None:
    """Convert an official UniSeg checkpoint (nnU-Net v1 .model, upstream or downstream) to a model file of this
    package: {"model", "network_def", "tasks", "provenance"}, usable from anywhere (predict --checkpoint, bundles).

    Args:
        src: official checkpoint (a dict with ``state_dict``: nnU-Net v1 keys, (z, y, x) axes).
        dst: output ``.pt``.
        bundle: instead of DST, install into a bundle (folder or name): weights that fit its network become
            ``models/model.pt``, upstream weights given to a fine-tuning bundle its ``models/pretrained.pt``; with
            ``<name>_provenance.json`` (source, sha256, the weights' non-commercial licence).
        task: task of a downstream checkpoint (default: the built-in task with its class count); refused for an
            upstream one (its tasks are the paper's) or one with a tasks.json beside it (that file says its task).
        overwrite: replace the output if it exists (otherwise an existing file is never touched).
    """
    if bool(dst) == bool(bundle):
        raise UsageError("give exactly one of DST or --bundle")
    if task and bundle:
        raise UsageError("--task names a downstream model's task for DST; with --bundle the bundle's task is used")
    report = convert_into_bundle(src, bundle, overwrite) if bundle else convert_official(src, dst, task, overwrite)
    print(_json.dumps(report, indent=2))
    print(f"licence of these weights: {report['licence']}", file=sys.stderr)


def _weights(bundle: str = DEFAULT_BUNDLE, url: str = "", overwrite: bool = False) -> None:
    """Fetch a bundle's pretrained weights (its large_files.yml: the official UniSeg release), check that they are
    a UniSeg of the bundle's architecture, convert an official container and install them with provenance.

    Args:
        bundle: bundle folder or name (uniseg_pretrain: models/model.pt; uniseg_finetune_btcv / _vs:
            models/pretrained.pt, their default starting point).
        url: instead of large_files.yml's url: http(s), Google Drive, file:// or a local path.
        overwrite: replace an existing model file (otherwise it is never touched).
    """
    report = download_weights(bundle, url=url, overwrite=overwrite)
    print(_json.dumps(report, indent=2))
    print(f"integrity of the download: {report['integrity']}", file=sys.stderr)
    print(f"licence of these weights: {report['licence']}", file=sys.stderr)


def _pack_bundles(out: str = "dist", bundles: str | list[str] = "") -> None:
    """Write OUT/<bundle>_v<version>.zip for each bundle in the layout of `python -m monai.bundle download --source
    github`; weights stay out (large_files.yml fetches them).

    Args:
        out: folder of the zips.
        bundles: bundle folders or names, comma-separated (default every bundle of ./bundles, else of the
            installed source tree).
    """
    from pathlib import Path

    from uniseg_monai.apps.bundles import pack_bundle

    root = Path("bundles") if Path("bundles").is_dir() else Path(__file__).resolve().parents[1] / "bundles"
    names = [bundles] if isinstance(bundles, str) and bundles else list(bundles)
    names = names or sorted(str(p) for p in root.iterdir() if (p / "configs").is_dir())
    for name in names:
        print(pack_bundle(name, out))


def _tasks(*, json: bool = False, datalist: str | None = None, metadata: str = "", check: bool = False) -> None:
    """Print the task registry as a table or JSON; with --datalist, the tasks that datalist uses.

    Args:
        json: print JSON instead of a table.
        datalist: print the tasks of this datalist (the built-in ones it names and its own "tasks").
        metadata: instead, write the network_data_format of this bundle's configs/metadata.json from its
            models/tasks.json and network.
        check: with --metadata, only compare and exit 1 if it differs.
    """
    if check and not metadata:
        raise UsageError("--check compares a bundle's metadata.json with its task table: give --metadata BUNDLE too")
    if metadata:
        from uniseg_monai.apps.metadata import sync_metadata

        path, differs = sync_metadata(metadata, check=check)
        print(f"{path}: network_data_format " + ("differs from the task table" if check and differs
              else "updated" if differs else "up to date"))  # fmt: skip
        if check and differs:
            sys.exit(1)
        return
    registry = registry_for_datalist(datalist) if datalist else TaskRegistry()
    print(_json.dumps(registry.to_json(), indent=2) if json else registry.table())


def _finetune_bundles(check: bool = False, root: str = "") -> None:
    """Write the fine-tuning bundles from their one template (bundles/templates/finetune/ with the task facts and
    the texts of bundles/templates/finetune_bundles.json): only the files that change.

    Args:
        check: only compare: list the files that differ from what it would write (one line each), exit 1 if any.
        root: the bundles folder (default ./bundles, else the one of the installed source tree).
    """
    from pathlib import Path

    from uniseg_monai.apps.finetune_bundles import default_root, differences, write_bundles

    folder = Path(root) if root else default_root()
    written = [] if check else write_bundles(folder)
    for path in written:
        print(f"{path}: updated")
    remaining = differences(folder)  # after writing: only files no template makes
    for line in remaining:
        print(line)
    if remaining:
        sys.exit(1)
    if not written:
        print(f"{folder}: fine-tuning bundles up to date")


def _prepare(
    source: str, task: str, out: str, format: str = "msd", val_fraction: float = 0.2, test_fraction: float | None = None
) -> None:
    """Add the cases of a release folder to a datalist as TASK (the datalist is created or merged).

    Args:
        source: the release folder.
        task: the task name its cases get.
        out: the datalist file.
        format: msd, nnunet, btcv (Synapse RawData) or vs (Vestibular-Schwannoma-SEG as NIfTI).
        val_fraction: share of the labelled training cases that become validation.
        test_fraction: share of the labelled cases that become testing (default the paper's split for btcv / vs,
            none otherwise).
    """
    from uniseg_monai.data.prepare import prepare

    counts = prepare(source, task, out, fmt=format, val_fraction=val_fraction, test_fraction=test_fraction)
    print(f"{out}: task {task!r}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))


def _generate_phantoms(out: str, seed: int = 0, overwrite: bool = False) -> None:
    """Write the deterministic synthetic multi-task data set (the demo's default data) and its datalist.

    Args:
        out: the folder of the images and OUT/datalist.json.
        seed: random seed of the phantoms.
        overwrite: replace an existing OUT/datalist.json and its phantom files (otherwise they are never touched).
    """
    from pathlib import Path

    from uniseg_monai.data.phantoms import generate_phantoms

    if (Path(out) / "datalist.json").exists() and not overwrite:
        raise FileExistsError(
            f"{Path(out) / 'datalist.json'} exists (nothing was changed): choose another --out, or pass --overwrite "
            "true to replace it and the phantom files"
        )
    print(generate_phantoms(out, seed=seed))


def _check_data(datalist: str) -> None:
    """Check a datalist and every file it names; print each problem with its fix; exit 1 if any.

    Args:
        datalist: the datalist JSON file.
    """
    from uniseg_monai.data.check import check_datalist

    problems = check_datalist(datalist)
    for problem in problems:
        print(f"ERROR {problem}")
    if problems:
        print(f"{len(problems)} problem(s) found in {datalist}")
        sys.exit(1)
    print(f"{datalist}: no problems found")


def _report(run_dir: str, out: str = "", datalist: str = "") -> None:
    """Write RUN_DIR/report.html with PNGs: training curves (TensorBoard logs under RUN_DIR), per-task Dice / NSD
    over the cases (per_case.csv) beside the paper's numbers, best / median / worst overlays per task and the
    prompt's effect (they need RUN_DIR/predictions and --datalist).

    Args:
        run_dir: the output folder of a training or evaluation run.
        out: write the report into this folder instead of RUN_DIR.
        datalist: the datalist that locates the images and references of the overlays.
    """
    from uniseg_monai.apps.report import write_report

    print(write_report(run_dir, out or None, datalist or None))


def _demo(
    out: str = "demo_output",
    bundle: str = DEFAULT_BUNDLE,
    finetune_bundle: str = "uniseg_finetune_btcv",
) -> None:
    """Train, evaluate and apply the pretrain bundle on the phantom data in OUT, then fine-tune FINETUNE_BUNDLE
    on an unseen phantom task from scratch and from it (what `make demo` runs).

    Args:
        out: output folder (phantoms, runs, reports); finished training runs are reused.
        bundle: the pretrain bundle (folder or name).
        finetune_bundle: the fine-tuning bundle (folder or name).
    """
    from uniseg_monai.apps.demo import run_demo

    run_demo(out, bundle, finetune_bundle)


def _ablate(
    out: str = "ablation_output",
    variants: str | list[str] = "",
    seeds: int | list[int] = 3,
    jobs: int | None = None,
    epochs: int | None = None,
    iterations: int | None = None,
    curve_every: int | None = None,
    bundle: str = DEFAULT_BUNDLE,
) -> None:
    """Train the paper's ablations and universal baselines side by side on the phantoms (same budget, network and
    optimiser: the demo's), over several seeds in parallel processes, and write OUT/ablation.md / .json (mean +- sd
    over seeds of per-task Dice, mean, spleen and tumour Dice, the prompt effect, both wrong-task rates, training
    time) and OUT/curves.png (wrong-task rates and tumour Dice against iterations).

    Args:
        out: output folder (phantoms, one run folder OUT/VARIANT/seed_K per run, ablation.md / .json, curves.png);
            finished runs are reused, interrupted ones resume.
        variants: comma-separated names (default uniseg, fixed_prompt, multiple_prompts, uniseg_t, dodnet,
            task_blind), any overlay in BUNDLE/configs/variants, e.g. fuse_2 or prompt_4n.
        seeds: a count N (seeds 0..N-1) or a list, e.g. [0,4,7]; each is the bundle id seed of its runs.
        jobs: runs at a time, each in its own process with cores // JOBS torch threads (default one per core, up to
            the runs to do).
        epochs: the budget is epochs x iterations per epoch (default the demo's, configs/demo.json).
        iterations: iterations per epoch (default the demo's).
        curve_every: keep a checkpoint every N epochs and score it for the learning curves (default epochs // 8).
        bundle: the pretrain bundle (folder or name) whose configs/variants hold the overlays.
    """
    from uniseg_monai.apps.ablation import VARIANTS, ablate

    names = [v for v in (variants.split(",") if isinstance(variants, str) else variants) if v] or list(VARIANTS)
    ablate(out, names, epochs, iterations, bundle, seeds, jobs, curve_every)


def _transfer(
    out: str = "transfer_output",
    seeds: int | list[int] = 3,
    jobs: int | None = None,
    epochs: int | None = None,
    iterations: int | None = None,
    bundle: str = "uniseg_finetune_btcv",
    pretrained: str = "",
    threshold: float = 0.8,
) -> None:
    """Fine-tune a phantom task unseen in pretraining (ph_kidneys) from scratch and from a pretrained UniSeg at the
    same budget (the fine-tuning bundle's configs/demo.json), over several seeds in parallel processes, and write
    OUT/transfer.md / .json (mean +- sd over seeds of the per-class test Dice, mean Dice, iterations to reach a
    validation Dice) and OUT/curves.png (validation Dice against iterations).

    Args:
        out: output folder (phantoms, the pretraining, one run folder OUT/from_scratch|fine_tuned/seed_K per run,
            transfer.md / .json, curves.png); finished runs are reused, interrupted ones resume.
        seeds: a count N (seeds 0..N-1) or a list, e.g. [0,4,7]; each is the bundle id seed of its two runs.
        jobs: runs at a time, each in its own process with cores // JOBS torch threads (default one per core, up to
            the runs to do).
        epochs: the budget is epochs x iterations per epoch (default the bundle's configs/demo.json).
        iterations: iterations per epoch (default configs/demo.json's).
        bundle: the fine-tuning bundle (folder or name) with a configs/demo.json.
        pretrained: the pretrained model file; '': the demo's pretraining, trained once into OUT/pretrained.
        threshold: the validation mean Dice whose first crossing is tabled.
    """
    from uniseg_monai.apps.transfer import transfer

    transfer(out, seeds, jobs, epochs, iterations, bundle, pretrained or None, threshold)


def _add_task(
    *,
    datalist: str = "",
    task: str = "",
    bundle: str = DEFAULT_BUNDLE,
    mode: str = "prompt",
    out: str = "",
    checkpoint: str = "",
    configs: str | list[str] = "",
    install: bool = False,
    rehearse: bool = True,
    **ids: Any,
) -> None:
    """Add a task to a trained UniSeg: the model grows one task slot (old tasks keep their outputs bit for bit) and
    trains on the datalist's cases of TASK; the new model lists N + 1 tasks and works with predict, --task all,
    MONAI Label and export as it is.

    Args:
        datalist: datalist whose "tasks" define TASK (modalities, labels, spacing, ...) and that holds its cases.
        task: the task to add (a name the model does not have).
        bundle: the bundle (folder or name) whose models/model.pt and configs/train.json are used.
        mode: prompt (only parts no old task reads: old tasks stay bit-identical), decoder (also the decoder and
            heads) or full (everything).
        out: folder of the new model (default BUNDLE/models_TASK); the base model is never written.
        checkpoint: the base model file instead of BUNDLE/models/model.pt.
        configs: extra config overlays of the bundle, comma-separated (e.g. demo for the demo network's settings).
        install: then make the new model the bundle's models/model.pt (the old one kept as model_before_<time>.pt).
        rehearse: in decoder / full mode also train and validate on the datalist's cases of the old tasks, which
            limits how much they change (with false, on the new task's cases only).
        ids: other bundle ids, e.g. --epochs 50 --iterations_per_epoch 250 --learning_rate 0.005.
    """
    from uniseg_monai.apps.add_task import add_task

    if not datalist or not task:
        raise UsageError(
            "give the datalist that defines the task and holds its cases and the task's name: --datalist FILE --task "
            "NAME (options only, no positional arguments; see uniseg add-task --help)"
        )
    names = [c for c in (configs.split(",") if isinstance(configs, str) else configs) if c]
    result = add_task(datalist, task, bundle, mode, out, checkpoint, names, install, rehearse, **ids)
    print(_json.dumps(result, indent=2))


def _export(
    bundle: str = DEFAULT_BUNDLE,
    onnx: str = "",
    checkpoint: str | None = None,
    in_channels: int = 1,
    overwrite: bool = False,
    **overrides: Any,
) -> None:
    """Export a bundle's trained network to ONNX (--onnx FILE): inputs image (B, C, X, Y, Z) and task_id (B,),
    dynamic batch and spatial axes, checked against PyTorch with ONNX Runtime before the file is written.

    TorchScript: `python -m monai.bundle ckpt_export` (see the bundle docs).

    Args:
        bundle: bundle folder or name whose inference config builds the network.
        onnx: the .onnx file to write.
        checkpoint: model file (default BUNDLE/models/model.pt).
        in_channels: image channels (1, 2 or 4), which select the one modality stem in the file.
        overwrite: replace an existing .onnx file.
        overrides: other ids of the bundle's inference.json, e.g. --patch_size [64,64,32].
    """
    from uniseg_monai.apps.export import export_bundle_onnx

    try:
        import onnx as _onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise UsageError(f"ONNX export needs onnx and onnxruntime ({err}): pip install -e '.[onnx]'") from None
    if not onnx:
        raise UsageError("give the output file: --onnx model.onnx")
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise UsageError(f"--in_channels must be a channel count (1, 2 or 4), got {in_channels!r}")
    report = export_bundle_onnx(bundle, onnx, in_channels, ckpt=checkpoint, overwrite=overwrite, **overrides)
    print(_json.dumps(report, indent=2))


def _typed(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` with fire's guesses undone: fire turns ``--url 123`` into an int and ``--overwrite=false`` into
    the (true) string 'false'; path arguments become strings again and flags accept only true/false/yes/no/1/0."""
    hints = {name: str(p.annotation) for name, p in inspect.signature(command).parameters.items()}

    def coerce(name: str, value: Any) -> Any:
        hint = hints.get(name, "")
        if hint == "bool":
            return flag(value, name)
        if hint.startswith("str") and value is not None and not isinstance(value, str):
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value)
        return value

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        names = list(hints)
        args = tuple(coerce(names[i] if i < len(names) else "", a) for i, a in enumerate(args))
        return command(*args, **{k: coerce(k, v) for k, v in kwargs.items()})

    return run


@functools.wraps(predict)
def _predict(*args: Any, **kwargs: Any) -> None:
    sys.exit(predict(*args, **kwargs))  # 1 when any input failed


COMMANDS: dict[str, Callable[..., Any]] = {
    name: _typed(command)
    for name, command in {
        "convert-official": _convert_official,
        "weights": _weights,
        "pack-bundles": _pack_bundles,
        "tasks": _tasks,
        "finetune-bundles": _finetune_bundles,
        "prepare": _prepare,
        "generate-phantoms": _generate_phantoms,
        "check-data": _check_data,
        "demo": _demo,
        "ablate": _ablate,
        "transfer": _transfer,
        "report": _report,
        "add-task": _add_task,
        "export": _export,
        "predict": _predict,
        "label-server": label_server,
    }.items()
}
INTERRUPTED = {  # what Ctrl-C left, per command
    "predict": "nothing partial was written; run again (with --skip_existing to keep the finished cases)",
    "add-task": "the training continues with the same command and --resume true",
    "ablate": "run the same command again: finished runs are reused, interrupted ones resume",
    "transfer": "run the same command again: finished runs are reused, interrupted ones resume",
}
SHORT_FLAGS = {"predict": {"-i": "--input", "-o": "--output"}}  # TotalSegmentator's spelling


def _long_flags(argv: list[str]) -> list[str]:
    """A command's short flags (``-o x``, ``-o=x``) spelled out: fire takes a one-letter flag only when a single
    option starts with that letter, and ``-o`` could be ``--output``, ``--overwrite`` or ``--overlap``."""
    short = SHORT_FLAGS.get(argv[0], {}) if argv else {}
    out = argv[:1]
    for arg in argv[1:]:
        flag, eq, value = arg.partition("=")
        out.append(short[flag] + eq + value if flag in short else arg)
    return out


def _check_options(command: str, argv: list[str]) -> None:
    """Refuse an unknown --option before anything runs (fire would run the command first, then complain)."""
    parameters = inspect.signature(COMMANDS[command]).parameters
    if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        return  # predict and export pass other --ids to the bundle config, which checks them first
    for arg in argv:
        name = arg[2:].split("=")[0].replace("-", "_") if arg.startswith("--") and len(arg) > 2 else ""
        if name and name not in parameters:
            options = ", ".join(f"--{p}" for p in parameters)
            raise UsageError(f"unknown option {arg.split('=')[0]} for `uniseg {command}` (options: {options})")


LIST_HINTS = ("list", "Sequence", "tuple")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_list_values(command: str, argv: list[str]) -> None:
    """Refuse a list option written as separate words (``--patch_size 63 63 15``): fire takes the first number as
    the value and the others as positional arguments of other options (it said "--tta takes true or false, got
    15"). A list option is one whose parameter is a list / sequence, or any bundle id of a command that passes
    other ids to a bundle config."""
    parameters = inspect.signature(COMMANDS[command]).parameters
    overrides = any(p.kind == p.VAR_KEYWORD for p in parameters.values())
    for i, arg in enumerate(argv):
        if not arg.startswith("--") or len(arg) < 3:
            continue
        key, eq, value = arg[2:].partition("=")
        parameter = parameters.get(key.replace("-", "_"))
        if not (overrides if parameter is None else any(h in str(parameter.annotation) for h in LIST_HINTS)):
            continue
        words = [value] if eq else []
        for word in argv[i + 1 :]:
            if not _is_number(word):
                break
            words.append(word)
        if len(words) > 1 and all(map(_is_number, words)):
            joined = ",".join(words)
            raise UsageError(
                f"--{key} takes one value: write [{joined}] or {joined} (no spaces), got {' '.join(words)}"
            )


def _fire_error(trace: Any) -> None:
    """Fire's display of a command line it cannot run (its error and an 8-line usage) as one :class:`UsageError`:
    an unknown command, a missing required argument or another of fire's errors, naming the ``--help`` to read."""
    args, error = trace.elements[-1].args, trace.elements[-1].ErrorAsStr()
    if any(a in ("-h", "--help") for a in args):
        return _DISPLAY_ERROR(trace)  # fire's own help
    command = trace.GetCommand()
    if command == "uniseg" and args:
        same = [c for c in COMMANDS if c.lower() == str(args[0]).lower().replace("_", "-")]
        hint = f" (did you mean {same[0]}?)" if same else ""
        raise UsageError(f"unknown command {args[0]!r}{hint}; commands: {', '.join(COMMANDS)} (see `uniseg --help`)")
    missing = error.partition("required argument: ")[2]
    what = f"missing --{missing}" if missing else error
    raise UsageError(f"`{command}`: {what} (see `{command} --help`)")


_DISPLAY_ERROR = fire.core._DisplayError
fire.core._DisplayError = _fire_error  # one line instead of fire's error and usage, for every command


def main(argv: list[str] | None = None) -> None:
    """Run one ``uniseg`` command; user errors print one line and exit with status 2 (``UNISEG_DEBUG=1``: the
    traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    argv = _long_flags(argv)
    try:
        if argv in (["--help"], ["-h"]):
            argv = ["--", "--help"]  # fire's own spelling: its help without "INFO: Showing help with the command ..."
        elif argv and argv[0] in COMMANDS:
            if any(a in ("--help", "-h") for a in argv[1:]):
                argv = [argv[0], "--", "--help"]  # else a command with **overrides takes --help as a setting
            else:
                _check_options(argv[0], argv[1:])
                _check_list_values(argv[0], argv[1:])
        fire.Fire(COMMANDS, command=argv, name="uniseg")
    except KeyboardInterrupt:
        hint = INTERRUPTED.get(argv[0] if argv else "", "")
        print(f"uniseg: interrupted{f' ({hint})' if hint else ''}", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        cause = user_error(err)
        if cause is None or debugging():
            raise
        print(f"uniseg: error: {one_line(cause)}", file=sys.stderr)
        sys.exit(2)
