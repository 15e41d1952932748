"""``uniseg predict``: segment images with a trained UniSeg model in one command (TotalSegmentator style).

Everything comes from the bundle's ``configs/inference.json`` (see :class:`Predictor`), so the maps equal the
bundle's own inference.
"""

from __future__ import annotations

import gzip
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose
from tqdm import tqdm

from uniseg_monai.atomic import write_atomic, write_text_atomic
from uniseg_monai.bundles import DEFAULT_BUNDLE, open_inference
from uniseg_monai.errors import InputError, UsageError
from uniseg_monai.model_files import ModelFile, load_into
from uniseg_monai.tasks import Task
from uniseg_monai.transforms import IMAGE_SUFFIXES, ThreadSafeLoadImaged, image_stem

MERGE_RULE = (
    "tasks in id order; merged label = running index over their (task, class) pairs without background; "
    "where tasks overlap the later task wins"
)
Case = tuple[str | list[str], list[Path]]  # loader input (file, DICOM folder or one file per channel), files read


def find_cases(entries: str | Sequence[str], exclude: Path | None = None) -> dict[str, Case]:
    """Case name -> :data:`Case` for INPUT: paths (a list, or comma-separated), each a file, a DICOM series folder,
    a folder of such (one case per image file or sub-folder but ``exclude``) or ``ch1+ch2`` (one case, one file per
    channel)."""
    entries = [str(entries)] if isinstance(entries, (str, Path)) else [str(e) for e in entries]
    entries = [p for e in entries for p in ([e] if Path(e).exists() else e.split(",")) if p]
    cases: dict[str, Case] = {}

    def add(name: str, source: str | list[str], files: list[Path]) -> None:
        if name in cases:
            raise InputError(f"two inputs make the case {name!r} ({cases[name][0]} and {source}): rename one")
        cases[name] = (source, files)

    for entry in entries:
        path = Path(entry)
        if not path.exists() and "+" in entry:
            channels = [Path(c) for c in entry.split("+")]
            for c in channels:
                if not c.is_file():
                    raise FileNotFoundError(f"input channel {c} (of {entry}) not found")
            add(image_stem(channels[0].name), [str(c) for c in channels], channels)
        elif path.is_file():
            add(image_stem(path.name), str(path), [path])
        elif path.is_dir():
            children = sorted(p for p in path.iterdir() if not p.name.startswith("."))
            images = [p for p in children if p.is_file() and p.name.endswith(IMAGE_SUFFIXES)]
            series = [p for p in children if p.is_dir() and not (exclude and p.resolve() == exclude.resolve())]
            if not children:
                raise InputError(f"input folder {path} is empty")
            if not images and not series:  # the folder itself is one DICOM series
                series = [path]
            for p in images:
                add(image_stem(p.name), str(p), [p])
            for s in series:
                add(s.name, str(s), sorted(f for f in s.iterdir() if f.is_file()))
        else:
            raise FileNotFoundError(f"input {entry} not found")
    if not cases:
        raise UsageError("no input given")
    return cases


def _takes(task: Task, modality: str) -> bool:
    """Whether ``task`` has a ``modality`` channel: CT, PET, MR (any sequence but CT/PET) or a name such as T1ce."""
    names = [m.upper() for m in task.modalities]
    return modality.upper() in names or (modality.upper() == "MR" and any(n not in ("CT", "PET") for n in names))


def _write_nifti(path: Path, labels: np.ndarray, affine: np.ndarray) -> None:
    """Label map (X, Y, Z) as gzipped NIfTI, qform and sform = ``affine`` (RAS), written atomically."""
    image = nib.Nifti1Image(labels, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    write_atomic(path, lambda f: f.write(gzip.compress(image.to_bytes(), compresslevel=1)))


def merge(maps: dict[str, np.ndarray], tasks: Sequence[Task]) -> tuple[np.ndarray, dict[str, dict[str, Any]]]:
    """Task maps (X, Y, Z) -> merged map (X, Y, Z; uint8, or uint16 past 255 labels) and its label table by
    :data:`MERGE_RULE`."""
    table: dict[str, dict[str, Any]] = {"0": {"task": None, "class": 0, "name": "background"}}
    merged = np.zeros(next(iter(maps.values())).shape, np.int64)
    for task in sorted(tasks, key=lambda t: t.id):
        offset = len(table) - 1
        table.update({str(offset + k): {"task": task.name, "class": k, "name": task.labels[k]}
                      for k in range(1, task.num_classes)})  # fmt: skip
        merged = np.where(maps[task.name] > 0, maps[task.name].astype(np.int64) + offset, merged)
    return merged.astype(np.uint8 if len(table) <= 256 else np.uint16), table


def predict_config(
    bundle: str, checkpoint: str | None, task: str, settings: dict[str, Any], progress: bool
) -> tuple[ConfigParser, ModelFile]:
    """The bundle's inference config for the model file (:func:`uniseg_monai.bundles.open_inference`) with the ids
    ``uniseg predict`` sets: windows on the device, the volume stitched on the CPU, no ``SaveImaged``."""
    ids = {"sw_device": "@device", "stitch_device": "$torch.device('cpu')", "progress": progress}
    ids["save_predictions"] = False
    return open_inference(bundle, checkpoint, {"task": "" if task == "all" else task, **settings, **ids})


class Predictor:
    """A bundle's inference config and model, loaded once, that segments cases (:meth:`segment`) and writes them
    (:meth:`write`).

    Everything comes from ``configs/inference.json`` (opened for the model file by
    :func:`uniseg_monai.bundles.open_inference`): task registry, network, ``preprocessing``, ``inferer`` and
    ``all_inferer``, ``postprocessing`` with its ``SaveImaged`` switched off (``save_predictions``), windows on the
    device (``sw_device``) and the volume stitched on the CPU (``stitch_device``).
    """

    def __init__(
        self, bundle: str, checkpoint: str | None, task: str, settings: dict[str, Any], progress: bool
    ) -> None:
        parser, self.model = predict_config(bundle, checkpoint, task, settings, progress)
        self.all = task == "all"
        self.registry = parser.get_parsed_content("registry")
        self.network = parser.get_parsed_content("network_def")
        load_into(self.network, self.model)
        self.device = parser.get_parsed_content("device")
        self.network.to(self.device).eval()
        self.amp = bool(parser.get_parsed_content("amp")) and self.device.type == "cuda"
        steps = parser.get_parsed_content("preprocessing").transforms
        self.load = next(t for t in steps if isinstance(t, ThreadSafeLoadImaged))  # read once for all tasks
        self.preprocess = Compose([t for t in steps if t is not self.load])
        self.postprocess = parser.get_parsed_content("postprocessing")
        window, per_batch = parser.get_parsed_content("patch_size"), parser.get_parsed_content("sw_batch_size")
        if not (isinstance(window, list) and len(window) == 3 and all(isinstance(v, int) and v > 0 for v in window)):
            raise UsageError(f"--patch_size must be [x, y, z] positive integers, got {window!r}")
        if not isinstance(per_batch, int) or per_batch < 1:
            raise UsageError(f"--sw_batch_size must be a positive integer, got {per_batch!r}")
        self.inferer = parser.get_parsed_content("all_inferer" if self.all else "inferer")
        self.sidecar = {"checkpoint": str(self.model.path.resolve()),
                        "bundle": str(Path(parser["bundle_root"]).resolve()), "device": str(self.device)}  # fmt: skip
        if self.model.provenance:
            self.sidecar["weights_licence"] = self.model.provenance.get("licence", "")

    def tasks(self, task: str, modality: str | None) -> list[Task]:
        """The tasks ``task`` (a name or ``all``) means, those with a ``modality`` channel when given."""
        tasks = sorted(self.registry.values(), key=lambda t: t.id) if task == "all" else [self.registry[task]]
        tasks = [t for t in tasks if not modality or _takes(t, modality)]
        if not tasks:
            raise UsageError(
                f"no task ({task}) of the model takes {modality} images; its tasks: {sorted(self.registry)}"
            )
        return tasks

    def segment(
        self, image: torch.Tensor, tasks: list[Task]
    ) -> tuple[dict[str, np.ndarray], dict[str, dict], np.ndarray]:
        """Image (C, X, Y, Z) on its own grid -> {task: labels (X, Y, Z) on that grid}, {task: sidecar fields},
        affine; one sliding-window pass per group of tasks with the same spacing and normalisation."""
        passes: dict[tuple, list[Task]] = {}
        for t in tasks:
            passes.setdefault((t.spacing, t.normalization), []).append(t)
        maps, meta = {}, {}
        for group in passes.values():
            tic = time.perf_counter()
            item = self.preprocess({"image": image.clone() if len(passes) > 1 else image, "task": group[0].name})
            x = item["image"][None]  # (1, C, X', Y', Z') at the task spacing, on the CPU
            times, tic = {"preprocess": time.perf_counter() - tic}, time.perf_counter()
            with torch.no_grad(), torch.autocast(self.device.type, enabled=self.amp):
                if self.all:
                    logits = self.inferer(x, self.network, [t.id for t in group])  # {id: (1, C_t, X', Y', Z')}
                else:
                    logits = {group[0].id: self.inferer(x, self.network)}
            times["inference"] = time.perf_counter() - tic
            for t in group:
                tic = time.perf_counter()
                with torch.no_grad():  # softmax, inverse of the preprocessing, argmax: (1, X, Y, Z)
                    pred = self.postprocess({"image": item["image"], "pred": logits[t.id][0], "task": t.name})["pred"]
                maps[t.name] = pred.array[0].astype(np.uint8)
                times["postprocess"] = time.perf_counter() - tic
                meta[t.name] = {"task_id": t.id, "labels": dict(enumerate(t.labels)), "pass": [g.name for g in group],
                                "timings_s": dict(times)}  # fmt: skip
        return maps, meta, pred.affine.numpy()

    def write(self, out: Path, name: str, source: str | list[str], tasks: list[Task], run: dict[str, Any]) -> None:
        """Load one case, segment it under ``tasks`` (those whose channel count fits) and write its maps and
        sidecars (plus the merged map for ``all``); ``run``: more sidecar fields."""
        tic = time.perf_counter()
        image = self.load({"image": source})["image"]  # (C, X, Y, Z) on the input grid
        fits = [t for t in tasks if t.in_channels == image.shape[0]]
        if not fits:
            wanted = ", ".join(f"{t.name} takes {'+'.join(t.modalities)}" for t in tasks)
            raise InputError(f"the image has {image.shape[0]} channel(s), but {wanted}")
        loaded = time.perf_counter() - tic
        maps, meta, affine = self.segment(image, fits)
        inputs = {"case": name, "input": [source] if isinstance(source, str) else source}
        for t in fits:
            _write_nifti(out / f"{name}_{t.name}.nii.gz", maps[t.name], affine)
            meta[t.name]["timings_s"]["load"] = loaded
            sidecar = {**inputs, "task": t.name, **meta[t.name], **self.sidecar, **run}
            write_text_atomic(out / f"{name}_{t.name}.json", json.dumps(sidecar, indent=2) + "\n")
        if self.all:
            merged, table = merge(maps, fits)
            _write_nifti(out / f"{name}_all_merged.nii.gz", merged, affine)
            sidecar = {**inputs, "task": "all", "rule": MERGE_RULE, "labels": table, **self.sidecar, **run}
            write_text_atomic(out / f"{name}_all_merged.json", json.dumps(sidecar, indent=2) + "\n")


def predict(
    input: str | Sequence[str],
    output: str,
    task: str,
    bundle: str = DEFAULT_BUNDLE,
    checkpoint: str | None = None,
    tta: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    overlap: float = 0.5,
    modality: str | None = None,
    **overrides: Any,
) -> int:
    """Segment images with a trained model; returns 0, or 1 if any case failed (its file and reason on stderr,
    the other cases still written, a summary line at the end).

    Args:
        input: a NIfTI / NRRD / MHA file, a DICOM series folder, a folder of such (one case per image file or
            sub-folder), or several (comma-separated). Channels of one multi-modal case are joined by ``+`` in the
            task's modality order: ``ct.nii.gz+pet.nii.gz``. A case is named after its (first) file or folder.
        output: folder for ``<case>_<task>.nii.gz`` (uint8 labels = the task's classes, input shape and affine,
            NIfTI whatever the input format) and ``<case>_<task>.json`` (labels, task, checkpoint, bundle, inputs,
            timings in s). Refused if it holds an input; files appear complete (temp file, then rename).
        task: a task of the model (its ``tasks.json``), or ``all``: every task whose channel count fits the case,
            in one sliding-window pass per spacing/normalisation (encoder once, decoder per task), plus
            ``<case>_all_merged.nii.gz`` / ``.json``: tasks in id order, merged label = running index over their
            non-background classes, later tasks win where they overlap; the table is in the JSON.
        bundle: bundle folder or name (``./bundles/NAME``, the installed source tree's ``bundles/NAME``, then
            ``$UNISEG_HOME/bundles/NAME``); its ``configs/inference.json`` defines pre-/post-processing and inferer.
        checkpoint: model file, default ``<bundle>/models/model.pt``: one this package wrote (it carries its network
            and task table, so it works from anywhere), an official UniSeg ``.model`` (converted on the fly), or an
            older state dict with ``tasks.json`` beside it; never unpickled code.
        tta: average the 8 mirrorings of every window (8x time).
        overwrite: replace outputs of an earlier run; without it, existing ``<case>_<task>`` files stop the command
            before any inference.
        device: ``cpu`` or ``cuda`` (default: cuda if available).
        overlap: sliding-window overlap in [0, 1).
        modality: keep only tasks with a CT, PET (CT+PET tasks), MR (any MR sequence) or e.g. T2 channel.
        overrides: other ids of ``inference.json``, e.g. ``--base_features 4 --patch_size [64,64,32]``.

    Memory: only windows (sw_batch_size x C x patch) go to the device, so its memory does not grow with the
    volume; the volume is padded and the logits stitched on the CPU: float32 x (classes of the pass, summed over
    its tasks with ``all``, + 1 weight map) x preprocessed voxels, then float32 x classes x original voxels per
    task for the inverse resampling of the softmax. A single ``--task`` needs less than ``all``.
    """
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} is a file: give a folder")
    try:
        overlap = float(overlap)
    except (TypeError, ValueError):
        raise UsageError(f"--overlap must be a number in [0, 1), got {overlap!r}") from None
    if not 0 <= overlap < 1:
        raise UsageError(f"--overlap must lie in [0, 1), got {overlap}")
    if device and not (device == "cpu" or (device.startswith("cuda") and torch.cuda.is_available())):
        raise UsageError(f"--device {device}: use cpu" + (" or cuda[:N]" if torch.cuda.is_available() else " (no GPU)"))
    cases = find_cases(input, exclude=out)
    for _, files in cases.values():
        for f in files:
            if out.resolve() in (f.resolve().parent, f.absolute().parent.resolve()):
                raise UsageError(f"output folder {out} holds the input {f}: choose another one")
    settings = {"tta": bool(tta), "overlap": float(overlap), **overrides}
    if device:
        settings["device"] = f"$torch.device({str(device)!r})"
    predictor = Predictor(bundle, checkpoint, task, settings, progress=len(cases) == 1)
    tasks = predictor.tasks(task, modality)
    names = [t.name for t in tasks] + (["all_merged"] if task == "all" else [])
    earlier = [p for c in cases for n in names for p in (out / f"{c}_{n}.nii.gz", out / f"{c}_{n}.json") if p.exists()]
    if earlier and not overwrite:
        raise FileExistsError(
            f"{earlier[0]} exists ({len(earlier)} output file(s) of an earlier run in {out}); pass --overwrite to "
            "replace them, or choose another output folder"
        )
    failed: dict[str, str] = {}
    for name, (source, _) in tqdm(cases.items(), desc="uniseg predict", unit="case"):
        try:
            predictor.write(out, name, source, tasks, {"tta": bool(tta), "overlap": float(overlap)})
        except Exception as err:  # one bad case must not stop the others
            while err.__cause__ is not None:
                err = err.__cause__
            failed[name] = f"{type(err).__name__}: {str(err).strip()}"
            tqdm.write(f"uniseg predict: {name} ({source}) failed: {failed[name]}", file=sys.stderr)
    print(f"uniseg predict: {len(cases) - len(failed)} case(s) written to {out}, {len(failed)} failed"
          + (f": {', '.join(failed)}" if failed else ""))  # fmt: skip
    return int(bool(failed))
