"""Finding bundles by name, opening a bundle's inference config for a model file, and packing bundles as zips.

A bundle name (``uniseg_pretrain``) resolves to the first of ``./bundles/NAME``, the ``bundles/NAME`` of the
source tree this package is installed from, and ``$UNISEG_HOME/bundles/NAME`` (default
``~/.cache/uniseg/bundles/NAME``: where ``python -m monai.bundle download --bundle_dir $UNISEG_HOME/bundles`` puts a
downloaded bundle). A path to a folder is used as it is.

A model file says which network it holds (``network_def``), so the bundle that runs it is known
(:func:`bundle_for_model`): a multi-task network (UniSeg and the baselines, which take task ids) the pretrain
bundle, a one-task fine-tuned network (UniSegBackbone) a fine-tuning bundle; a bundle of the other kind is refused
in one line naming the one to use (:func:`check_network`).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser, ConfigWorkflow
from monai.transforms import Transform

from uniseg_monai.core.atomic import write_atomic
from uniseg_monai.core.errors import UniSegError, UsageError
from uniseg_monai.model_io.model_files import (
    MODEL_FILE,
    NETWORK_CLASSES,
    ModelFile,
    ModelFileError,
    build_network,
    read_model,
)
from uniseg_monai.tasks import TaskRegistry

DEFAULT_BUNDLE = "uniseg_pretrain"
# the fine-tuning bundle of a task; a model fine-tuned on any other task runs with btcv's (their inference configs
# differ only in the default data folder and task: the model file brings its network and task table)
FINETUNE_BUNDLES = {"btcv": "uniseg_finetune_btcv", "vs": "uniseg_finetune_vs"}
INFERENCE_CONFIG = Path("configs") / "inference.json"
# a bundle zip holds configs, docs, LICENSE, large_files.yml and models/tasks.json: no weights (large_files.yml
# fetches them; official ones are non-commercial), no provenance of absent weights, no run outputs or caches
PACK_EXCLUDED_DIRS = ("eval", "__pycache__", "runs")
PACK_MODELS_KEPT = ("tasks.json",)


class BundleNotFoundError(UniSegError, FileNotFoundError):
    """No bundle of that name or path."""


def uniseg_home() -> Path:
    """The per-user folder for downloaded bundles: ``$UNISEG_HOME``, default ``~/.cache/uniseg``."""
    return Path(os.environ.get("UNISEG_HOME") or Path.home() / ".cache" / "uniseg")


def bundle_search_path(name: str) -> list[Path]:
    """Where the bundle called ``name`` is looked for, in order."""
    source_tree = Path(__file__).resolve().parents[2] / "bundles" / name
    return list(dict.fromkeys([Path("bundles") / name, source_tree, uniseg_home() / "bundles" / name]))


def find_bundle(bundle: str | os.PathLike) -> Path:
    """A bundle folder from a path or a name (see the module docstring); one line saying where it looked if not."""
    path = Path(bundle)
    if (path / INFERENCE_CONFIG).is_file():
        return path
    if path.exists() and len(path.parts) > 1:
        if path.is_file():
            raise BundleNotFoundError(
                f"bundle {path} is a file, but a bundle is a folder with {INFERENCE_CONFIG}: give the bundle folder "
                "or name (a model file goes to --checkpoint)"
            )
        raise BundleNotFoundError(f"{path} is not a bundle: it has no {INFERENCE_CONFIG}")
    looked = [path] if len(path.parts) > 1 else bundle_search_path(str(bundle))
    for candidate in looked:
        if (candidate / INFERENCE_CONFIG).is_file():
            return candidate
    raise BundleNotFoundError(
        f"bundle {str(bundle)!r} not found (looked in {', '.join(str(p) for p in looked)}); get it with "
        f"`python -m monai.bundle download --name {path.name} --bundle_dir {uniseg_home() / 'bundles'} --source github "
        "--repo OWNER/REPO/TAG` or pass the bundle folder"
    )


def bundle_workflow(bundle: str | os.PathLike, kind: str, configs: list[str], **ids) -> ConfigWorkflow:
    """The bundle's ``kind`` workflow ("train", "eval", "infer") initialised from ``configs/<name>.json`` for each
    name in ``configs`` (later files override earlier ones), with ``ids`` overriding config ids and ``bundle_root``
    set to the bundle folder. The configs' ``initialize`` section installs the one-line error hook."""
    folder = Path(bundle)
    meta, logging = folder / "configs" / "metadata.json", folder / "configs" / "logging.conf"
    workflow = ConfigWorkflow(
        config_file=[str(folder / "configs" / f"{name}.json") for name in configs],
        meta_file=str(meta) if meta.is_file() else None,
        logging_file=str(logging) if logging.is_file() else None,
        workflow_type=kind,
        bundle_root=str(folder),
        **ids,
    )
    workflow.initialize()
    return workflow


def run_workflow(bundle: str | os.PathLike, kind: str, configs: list[str], **ids) -> ConfigWorkflow:
    """Initialise (:func:`bundle_workflow`), run and finalise a bundle workflow, as ``python -m monai.bundle run``
    does; a user error raised in it reaches the caller as the project's one-line error."""
    workflow = bundle_workflow(bundle, kind, configs, **ids)
    workflow.run()
    workflow.finalize()
    return workflow


def bundle_name(bundle: Path) -> str:
    """The bundle's name as ``monai.bundle download`` and the zip use it: its folder name."""
    return bundle.resolve().name


def one_task_network(target: str | None) -> bool:
    """Whether the network class ``target`` (a ``network_def``'s ``_target_``) is a one-task network: no task
    ids in ``forward(x)``, no all-task inference (UniSegBackbone, what the fine-tuning bundles train)."""
    return target in NETWORK_CLASSES and not hasattr(NETWORK_CLASSES[target], "forward_tasks")


def bundle_for_model(model: ModelFile) -> str:
    """The name of the bundle that runs ``model``'s network: for a one-task network the fine-tuning bundle of its
    task (:data:`FINETUNE_BUNDLES`, else ``uniseg_finetune_btcv``), otherwise (also a file without ``network_def``)
    :data:`DEFAULT_BUNDLE`."""
    if not one_task_network((model.network_def or {}).get("_target_")):
        return DEFAULT_BUNDLE
    names = model.tasks.names if model.tasks is not None else []
    return next((FINETUNE_BUNDLES[t] for t in names if t in FINETUNE_BUNDLES), FINETUNE_BUNDLES["btcv"])


def check_network(folder: Path, parser: ConfigParser, model: ModelFile) -> None:
    """Refuse (one line naming the ``--bundle`` to pass) a model file whose network is of the other kind than the
    one the bundle's inference config runs: one-task vs multi-task (:func:`one_task_network`)."""
    theirs = (model.network_def or {}).get("_target_")
    ours = (parser.get("network_def") or {}).get("_target_")
    if not {theirs, ours} <= NETWORK_CLASSES.keys() or one_task_network(ours) == one_task_network(theirs):
        return

    def kind(target: str) -> str:
        return "a one-task (fine-tuned)" if one_task_network(target) else "a multi-task"

    names = model.tasks.names if model.tasks is not None else []
    tasks = f" ({len(names)} task(s): {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else ""
    raise ModelFileError(
        f"{model.path} holds {kind(theirs)} {theirs.rsplit('.', 1)[-1]}{tasks}, but bundle {folder} runs "
        f"{kind(ours)} {ours.rsplit('.', 1)[-1]}: pass --bundle {bundle_for_model(model)}"
    )


def check_weights(ckpt: Path, bundle: str | os.PathLike) -> None:
    """Refuse, in one line, a model file ``ckpt`` of ``bundle`` that does not exist (no weights fetched or trained)."""
    if not ckpt.is_file():
        raise ModelFileError(
            f"no weights at {ckpt}: get them with `uniseg weights --bundle {bundle}` (see README, 'Use a pretrained "
            "model'), or train the bundle"
        )


def open_inference(
    bundle: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    settings: dict[str, Any] | None = None,
) -> tuple[ConfigParser, ModelFile]:
    """The bundle's ``configs/inference.json`` set up for a model file: the file's own network (``network_def``,
    and ``patch_size`` from it) and task table (``registry``) when it carries them, ``ckpt_dir`` = its folder,
    then ``settings`` (other ids; an unknown id is an error). Returns the parser and the read model file.

    ``bundle`` None or empty: the one that runs the network of ``checkpoint`` (:func:`bundle_for_model`; without a
    checkpoint :data:`DEFAULT_BUNDLE`). A bundle that runs the other kind of network is refused
    (:func:`check_network`).
    """
    if checkpoint and Path(checkpoint).is_dir():
        raise ModelFileError(
            f"--checkpoint {checkpoint} is a folder, but it must be a model file: give the one in it, e.g. "
            f"{Path(checkpoint) / MODEL_FILE} (a bundle folder goes to --bundle)"
        )
    if checkpoint and not Path(checkpoint).is_file():
        raise ModelFileError(f"--checkpoint {checkpoint} not found: check the path")
    model = read_model(checkpoint) if checkpoint and not bundle else None
    bundle = bundle or (bundle_for_model(model) if model else DEFAULT_BUNDLE)
    folder = find_bundle(bundle)
    ckpt = Path(checkpoint) if checkpoint else folder / "models" / MODEL_FILE
    check_weights(ckpt, bundle)
    model = model or read_model(ckpt)
    parser = ConfigParser()
    parser.read_config(folder / INFERENCE_CONFIG)
    check_network(folder, parser, model)
    unknown = sorted(k for k in settings or {} if k not in parser)
    if unknown:
        raise UsageError(f"unknown bundle setting(s) {unknown}: not ids of {folder / INFERENCE_CONFIG}")
    parser.update({"bundle_root": str(folder), "ckpt_dir": str(ckpt.parent)})
    if model.tasks is None and model.official:  # a downstream backbone: its task is not in the file
        raise ModelFileError(
            f"{ckpt} is an official downstream UniSeg model ({(model.network_def or {}).get('num_classes')} classes), "
            f"which does not say its task: convert it once with `uniseg convert-official {ckpt} --dst model.pt --task "
            "TASK` and pass --checkpoint model.pt"
        )
    if model.tasks is None:
        raise ModelFileError(
            f"{ckpt} carries no task table and no tasks.json lies beside it: re-save it with this version's "
            "training or `uniseg convert-official`, or put the model's tasks.json beside it"
        )
    parser["registry"] = model.tasks
    if model.network_def is not None:
        parser["network_def"] = build_network(model.network_def)  # checked: no config code is evaluated
        if "patch_size" in model.network_def:
            parser["patch_size"] = model.network_def["patch_size"]
    parser.update(settings or {})
    return parser, model


def bundle_transforms(
    registry: TaskRegistry, *ids: str, bundle: str | os.PathLike = DEFAULT_BUNDLE, config: str = "train", **settings
) -> list[Transform]:
    """The transforms of the list ids ``ids`` of a bundle's ``configs/<config>.json`` built for ``registry`` (for
    scripts and notebooks), other ids set by ``settings``. E.g. the training pre-processing and the moreDA
    augmentation at a 64x64x32 patch: ``bundle_transforms(registry, "train#deterministic_transforms",
    "train#sampling_transforms", "augmentation_transforms", patch_size=[64, 64, 32])``."""
    parser = ConfigParser()
    parser.read_config(find_bundle(bundle) / "configs" / f"{config}.json")
    parser.update({"registry": registry, "default_task": "", "task": "", **settings})
    return [t for list_id in ids for t in parser.get_parsed_content(list_id)]


def pack_bundle(bundle: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write ``<out_dir>/<name>_v<version>.zip`` with the bundle under a ``<name>/`` base folder — the layout of
    ``python -m monai.bundle download --name <name> --source github --repo OWNER/REPO/TAG`` — without weights,
    run outputs or caches (``large_files.yml`` fetches the weights)."""
    folder = find_bundle(bundle)
    name = bundle_name(folder)
    version = json.loads((folder / "configs" / "metadata.json").read_text())["version"]
    out = Path(out_dir) / f"{name}_v{version}.zip"
    out.parent.mkdir(parents=True, exist_ok=True)

    def packed(path: Path) -> bool:
        parts = path.relative_to(folder).parts
        if parts[0] == "models":
            return parts[1:] in [(kept,) for kept in PACK_MODELS_KEPT]
        return not any(p.startswith(".") or p in PACK_EXCLUDED_DIRS for p in parts)

    files = sorted(p for p in folder.rglob("*") if p.is_file() and packed(p))

    def write(stream) -> None:
        with zipfile.ZipFile(stream, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in files:
                archive.write(path, Path(name) / path.relative_to(folder))

    write_atomic(out, write)
    return out
