"""``uniseg predict``: segment images with a trained UniSeg model in one command (TotalSegmentator style).

Everything comes from the bundle's ``configs/inference.json`` (see :class:`Predictor`), so the maps equal the
bundle's own inference.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose
from tqdm import tqdm

from uniseg_monai.apps.bundles import one_task_network, open_inference
from uniseg_monai.core.atomic import Writer, inside, temporaries, write_group
from uniseg_monai.core.errors import USER_ERRORS, InputError, UsageError, debugging, one_line, raised_in
from uniseg_monai.core.locks import owned
from uniseg_monai.core.progress import progress_bar
from uniseg_monai.data.check import READ_ERRORS, Volume, case_header, check_dicom_series
from uniseg_monai.data.dicom_seg import build_seg, check_seg_type, choose_series, require_highdicom, source_instances
from uniseg_monai.data.geometry import geometry_problem, resampled_voxels
from uniseg_monai.data.memory import GIB, available_memory, case_memory
from uniseg_monai.data.transforms import IMAGE_SUFFIXES, ThreadSafeLoadImaged, image_stem
from uniseg_monai.engine.precision import autocast_kwargs
from uniseg_monai.engine.wiring import check_numbers, check_patch_size
from uniseg_monai.model_io.model_files import ModelFile, load_into
from uniseg_monai.tasks import Task, check_task_name

MERGE_RULE = (
    "tasks in id order; merged label = running index over their (task, class) pairs without background; "
    "where tasks overlap the later task wins"
)
Case = tuple[str | list[str], list[Path]]  # loader input (file, DICOM folder or one file per channel), files read
OUTPUT_TYPES = ("nifti", "dicom_seg")
NAN_POLICIES = {"refuse": "refuse an image with NaN / Inf voxels", "min": "fill them with the lowest finite value"}


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
            if "" in entry.split("+"):
                raise InputError(f"input {entry}: the channel list (a+b) has an empty entry: give one file per channel")
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


def assumed_modalities(tasks: Sequence[Task]) -> str:
    """What ``--task all`` without ``--modality`` assumes: a case is segmented by every task of its channel count,
    whatever modality the task expects (an MR image gets CT maps)."""
    by_channels: dict[int, list[Task]] = {}
    for t in sorted(tasks, key=lambda t: t.id):
        by_channels.setdefault(t.in_channels, []).append(t)
    runs = "; ".join(f"{n} channel(s): " + ", ".join(f"{t.name} ({'+'.join(t.modalities)})" for t in group)
                     for n, group in sorted(by_channels.items()))  # fmt: skip
    return (
        f"--task all without --modality segments each case with every task of its channel count, assuming the image "
        f"has that task's modality ({runs}); pass --modality MR (or CT, PET, T2, ...) to run only the tasks of your "
        "images' modality"
    )


def _nifti(labels: np.ndarray, affine: np.ndarray) -> bytes:
    """A label map (X, Y, Z) as gzipped NIfTI, qform and sform = ``affine`` (RAS)."""
    image = nib.Nifti1Image(labels, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return gzip.compress(image.to_bytes(), compresslevel=1)


def _json(content: dict[str, Any]) -> Writer:
    """Writer of a JSON sidecar."""
    return _bytes((json.dumps(content, indent=2) + "\n").encode())


def _bytes(data: bytes) -> Writer:
    """Writer of ``data``."""
    return lambda f: f.write(data)


def _passes(tasks: Sequence[Task]) -> list[list[Task]]:
    """Tasks grouped into sliding-window passes: one per spacing and normalisation."""
    passes: dict[tuple, list[Task]] = {}
    for t in tasks:
        passes.setdefault((t.spacing, t.normalization), []).append(t)
    return list(passes.values())


def _gib(size: float) -> str:
    """Bytes as GiB, two significant digits below 0.1 GiB."""
    return f"{size / GIB:.1f}" if size >= 0.1 * GIB else f"{size / GIB:.2g}"


def _warn(message: str) -> None:
    tqdm.write(f"uniseg predict: warning: {message}", file=sys.stderr)


def _writable_folder(out: Path) -> list[Path]:
    """Create ``out`` if needed and prove it writable (a probe file written and removed) before anything is
    loaded; returns the folders it created, deepest first. Raises :class:`UsageError` naming the folder."""
    missing, folder = [], out.absolute()
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".uniseg_write_probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        _remove_empty(missing)
        raise UsageError(
            f"output folder {out} is not writable ({err.strerror or err}): fix its permissions or choose another one"
        ) from None
    return missing


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty: a run that wrote nothing leaves no folder."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _seg_names(case: str, stem: str) -> tuple[str, str]:
    """The DICOM SEG of a case and ``stem`` (a task, or ``all``) and its sidecar."""
    return f"{case}_{stem}.seg.dcm", f"{case}_{stem}.seg.json"


def _complete(out: Path, case: str, tasks: Sequence[Task], merged: bool, types: Sequence[str] = ("nifti",)) -> bool:
    """Whether every file a case would get exists: with ``dicom_seg`` in ``types`` its SEG and SEG sidecar; with
    ``nifti``, its task's map and sidecar; for ``all``, the merged map and sidecar and the map and sidecar of every
    task that fits the case: the tasks its merged sidecar lists, which must be those of ``tasks`` that take as many
    channels (a task whose channel count does not fit has no files)."""
    if "dicom_seg" in types:
        names = _seg_names(case, "all" if merged else tasks[0].name)
        if not all(inside(out, n).is_file() for n in names):
            return False
        if "nifti" not in types:
            return True

    def pair(stem: str) -> bool:
        return all(inside(out, f"{case}_{stem}{e}").is_file() for e in (".nii.gz", ".json"))

    if not merged:
        return pair(tasks[0].name)
    if not pair("all_merged"):
        return False
    try:
        table = json.loads((out / f"{case}_all_merged.json").read_text())["labels"]
        written = {entry["task"] for entry in table.values()} - {None}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    by_name = {t.name: t for t in tasks}
    if not written or not written <= set(by_name):  # merged from other tasks (e.g. another --modality)
        return False
    channels = {by_name[n].in_channels for n in written}
    return written == {t.name for t in tasks if t.in_channels in channels} and all(pair(n) for n in written)


def _sidecar(path: Path) -> Path:
    """The sidecar JSON of an output ``path`` (a map or the sidecar itself)."""
    return path.with_name(path.name.removesuffix(".nii.gz").removesuffix(".json").removesuffix(".dcm") + ".json")


def _written_by(path: Path) -> str | None:
    """The model file that wrote the output ``path`` (a map or a sidecar), as its sidecar says; None when no sidecar
    tells."""
    try:
        return json.loads(_sidecar(path).read_text()).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        return None


def _remove_orphans(out: Path) -> None:
    """Remove the temporaries of maps and sidecars (:func:`~uniseg_monai.core.atomic.temporaries`) that an interrupted
    run left in ``out``; called while ``out`` is owned (:func:`~uniseg_monai.core.locks.owned`): no live run writes
    them."""
    orphans = [path for path, name in temporaries(out).items() if name.endswith((".nii.gz", ".json", ".dcm"))]
    for path in orphans:
        path.unlink(missing_ok=True)
    if orphans:
        tqdm.write(f"uniseg predict: removed {len(orphans)} temporary file(s) of an interrupted run in {out}",
                   file=sys.stderr)  # fmt: skip


def merge(maps: dict[str, np.ndarray], tasks: Sequence[Task]) -> tuple[np.ndarray, dict[str, dict[str, Any]]]:
    """Task maps (X, Y, Z) -> merged map (X, Y, Z; uint8, or uint16 past 255 labels) and its label table by
    :data:`MERGE_RULE`."""
    order = sorted(tasks, key=lambda t: t.id)
    dtype = np.uint8 if sum(t.num_classes - 1 for t in order) < 256 else np.uint16
    table: dict[str, dict[str, Any]] = {"0": {"task": None, "class": 0, "name": "background"}}
    merged = np.zeros(next(iter(maps.values())).shape, dtype)
    for task in order:
        offset = len(table) - 1
        table.update({str(offset + k): {"task": task.name, "class": k, "name": task.labels[k]}
                      for k in range(1, task.num_classes)})  # fmt: skip
        labels = maps[task.name]
        np.copyto(merged, labels.astype(dtype) + dtype(offset), where=labels > 0)
    return merged, table


def predict_config(
    bundle: str | None, checkpoint: str | None, task: str, settings: dict[str, Any], progress: bool
) -> tuple[ConfigParser, ModelFile]:
    """The bundle's inference config for the model file (:func:`uniseg_monai.apps.bundles.open_inference`) with the ids
    ``uniseg predict`` sets: windows on the device, the volume stitched on the CPU, no ``SaveImaged``."""
    ids = {"sw_device": "@device", "stitch_device": "$torch.device('cpu')", "progress": progress}
    ids["save_predictions"] = False
    return open_inference(bundle, checkpoint, {"task": "" if task == "all" else task, **settings, **ids})


def check_values(image: torch.Tensor, files: list[str], nan_policy: str = "refuse") -> dict[str, Any]:
    """NaN / Inf voxels of an image (C, X, Y, Z) read from ``files`` (one per channel, or one): refused with their
    counts per file (:class:`InputError`), or with ``nan_policy`` ``min`` filled in place with the channel's lowest
    finite value (a warning; returns the sidecar field ``nan_policy``). Warns about a constant channel (e.g. all
    zeros), which is still segmented."""

    def file(c: int) -> str:
        return files[c] if len(files) == image.shape[0] else " + ".join(files)

    bad: dict[str, list[int]] = {}
    filled: dict[str, dict[str, Any]] = {}
    for c in range(image.shape[0]):
        if torch.isfinite(torch.stack(torch.aminmax(image[c]))).all():  # NaN / Inf voxels make an extreme NaN / Inf
            continue
        counts = [int(torch.isnan(image[c]).count_nonzero()), int(torch.isinf(image[c]).count_nonzero())]
        bad[file(c)] = [a + b for a, b in zip(bad.get(file(c), [0, 0]), counts)]
        finite = image[c][torch.isfinite(image[c])]
        if nan_policy == "min" and finite.numel():
            low = float(finite.min())
            image[c] = torch.nan_to_num(image[c], nan=low, posinf=low, neginf=low)
            filled[file(c)] = {"nan": counts[0], "inf": counts[1], "filled_with": low}
    if bad:
        text = "; ".join(f"{f}: " + " and ".join(f"{n:,} {k}" for n, k in zip(v, ("NaN", "Inf")) if n) + " voxels"
                         for f, v in bad.items())  # fmt: skip
        if nan_policy != "min":
            hint = "--nan_policy min fills them with the image's lowest value"
            raise InputError(f"{text}; fix the export or replace them ({hint})")
        if len(filled) < len(bad):
            raise InputError(f"{text}: no finite voxel to fill them with; fix the export")
        _warn(f"{text} filled with the lowest finite value (--nan_policy min)")
    for c in range(image.shape[0]):
        low, high = torch.aminmax(image[c])
        if low == high:
            _warn(f"{file(c)}: every voxel is {float(low):g} (a constant image): its map will mean nothing; check it")
    return {"nan_policy": filled} if filled else {}


class Predictor:
    """A bundle's inference config and model, loaded once, that segments cases (:meth:`segment`) and writes them
    (:meth:`write`).

    Everything comes from ``configs/inference.json`` (opened for the model file by
    :func:`uniseg_monai.apps.bundles.open_inference`): task registry, network, ``preprocessing``, ``inferer`` and
    ``all_inferer``, ``postprocessing`` with its ``SaveImaged`` switched off (``save_predictions``), windows on the
    device (``sw_device``) and the volume stitched on the CPU (``stitch_device``).
    """

    def __init__(
        self,
        bundle: str | None,
        checkpoint: str | None,
        task: str,
        settings: dict[str, Any],
        progress: bool,
        max_memory: float | None = None,
        nan_policy: str = "refuse",
        output_types: Sequence[str] = ("nifti",),
        seg_type: str = "binary",
        series: str | None = None,
    ) -> None:
        self.max_memory, self.nan_policy = max_memory, nan_policy  # bytes (None: the available memory per case)
        self.output_types, self.seg_type, self.series = tuple(output_types), seg_type, series
        self.default_coded: set[str] = set()  # tasks warned about: classes without a coded meaning
        parser, self.model = predict_config(bundle, checkpoint, task, settings, progress)
        if task == "all" and one_task_network((self.model.network_def or {}).get("_target_")):
            task = parser["task"] = self.model.tasks.names[0]  # a fine-tuned model: all = its one task
        self.task, self.all = task, task == "all"
        self.registry = parser.get_parsed_content("registry")
        self.network = parser.get_parsed_content("network_def")
        load_into(self.network, self.model)
        self.device = parser.get_parsed_content("device")
        self.network.to(self.device).eval()
        self.amp = bool(parser.get_parsed_content("amp")) and self.device.type == "cuda"
        amp_dtype = parser.get_parsed_content("amp_dtype", default="bfloat16")  # bundles before 0.6.0 lack the id
        self.amp_kwargs = autocast_kwargs(amp_dtype)
        steps = parser.get_parsed_content("preprocessing").transforms
        self.load = next(t for t in steps if isinstance(t, ThreadSafeLoadImaged))  # read once for all tasks
        self.preprocess = Compose([t for t in steps if t is not self.load])
        self.postprocess = parser.get_parsed_content("postprocessing")
        window, per_batch = parser.get_parsed_content("patch_size"), parser.get_parsed_content("sw_batch_size")
        check_numbers(sw_batch_size=per_batch)
        check_patch_size(window, getattr(self.network, "total_stride", (1, 1, 1)))
        self.inferer = parser.get_parsed_content("all_inferer" if self.all else "inferer")
        self.window, self.windows_on_cpu = window, None  # windows on the CPU: their share of host memory
        network_def = getattr(self.network, "network_def", dict)()
        if self.device.type == "cpu" and {"features", "strides"} <= set(network_def):
            self.windows_on_cpu = {"features": network_def["features"], "strides": network_def["strides"]}
            self.windows_on_cpu["batch"] = per_batch
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
        self, case: dict[str, torch.Tensor], tasks: list[Task]
    ) -> tuple[dict[str, np.ndarray], dict[str, dict], np.ndarray]:
        """``case["image"]`` (C, X, Y, Z) on its own grid -> {task: labels (X, Y, Z) on that grid}, {task: sidecar
        fields}, affine; one sliding-window pass per group of tasks with the same spacing and normalisation. The
        image is taken out of ``case`` for the last pass, so it is freed once resampled."""
        passes = _passes(tasks)
        maps, meta = {}, {}
        for i, group in enumerate(passes):
            tic = time.perf_counter()
            image = case.pop("image") if i == len(passes) - 1 else case["image"].clone()
            item = self.preprocess({"image": image, "task": group[0].name})
            del image
            x = item["image"][None]  # (1, C, X', Y', Z') at the task spacing, on the CPU
            times, tic = {"preprocess": time.perf_counter() - tic}, time.perf_counter()
            with torch.no_grad(), torch.autocast(self.device.type, enabled=self.amp, **self.amp_kwargs):
                if self.all:
                    logits = self.inferer(x, self.network, [t.id for t in group])  # {id: (1, C_t, X', Y', Z')}
                else:
                    logits = {group[0].id: self.inferer(x, self.network)}
            times["inference"] = time.perf_counter() - tic
            for t in group:
                tic = time.perf_counter()
                with torch.no_grad():  # softmax, inverse of the preprocessing, argmax: (1, X, Y, Z)
                    pred = self.postprocess({"image": item["image"], "pred": logits[t.id][0], "task": t.name})["pred"]
                maps[t.name] = pred.array[0]
                times["postprocess"] = time.perf_counter() - tic
                meta[t.name] = {"task_id": t.id, "labels": dict(enumerate(t.labels)), "pass": [g.name for g in group],
                                "timings_s": dict(times)}  # fmt: skip
        return maps, meta, pred.affine.numpy()

    def check(self, case: Volume, tasks: list[Task], loaded: int = 0) -> list[Task]:
        """The tasks of ``tasks`` whose channel count fits ``case`` (its files' headers, or for a DICOM series the
        loaded image), or an :class:`InputError` naming the file: no task fits, an affine or voxel size
        :func:`geometry_problem` refuses, or more host memory needed (:func:`~uniseg_monai.data.memory.case_memory`)
        than the limit (``--max_memory``, else the available memory plus the ``loaded`` bytes of an image in use)."""
        fits = [t for t in tasks if t.in_channels == case.channels]
        if not fits:
            wanted = ", ".join(f"{t.name} takes {'+'.join(t.modalities)}" for t in tasks)
            raise InputError(f"{case.path}: the image has {case.channels} channel(s), but {wanted}")
        for t in fits:
            problem = geometry_problem(case.affine, t)
            if problem:
                raise InputError(f"{case.path}: {problem}; fix the header (pixdim / affine) or resample the image")
        limit = self.max_memory
        if limit is None:  # the machine's available memory
            free = available_memory()
            limit = None if free is None else free + loaded
        passes = _passes(fits)
        need = case_memory(case.shape, case.channels, case.affine, passes, self.window, self.windows_on_cpu)
        if limit is not None and need > limit:
            shape = "x".join(str(n) for n in case.shape)
            resampled = max(resampled_voxels(case.shape, case.affine, g[0]) for g in passes)
            given = "--max_memory" if self.max_memory is not None else "available memory"
            raise InputError(
                f"{case.path}: needs ~{_gib(need)} GiB, limit {_gib(limit)} GiB ({given}): {shape} voxels x "
                f"{case.channels} channel(s), {resampled:,} at the task spacing, {len(fits)} task(s); pass "
                f"--max_memory {math.ceil(need / GIB * 10) / 10:g} (GiB) to allow it, or use a coarser/cropped image"
            )
        return fits

    def write(self, out: Path, name: str, source: str | list[str], tasks: list[Task], run: dict[str, Any]) -> None:
        """Check one case from its files' headers before reading a voxel (:func:`case_header`, :meth:`check`; a DICOM
        series once loaded), load it, refuse NaN / Inf voxels (:func:`check_values`), segment it under ``tasks``
        (those whose channel count fits) and write its maps and sidecars (plus the merged map for ``all``) together
        (:func:`write_group`: all or none of them appear); ``run``: more sidecar fields."""
        files = [source] if isinstance(source, str) else list(source)
        chosen = choose_series(files[0], self.series) if Path(files[0]).is_dir() else None
        if chosen is None or set(chosen.files) == {p for p in Path(files[0]).iterdir() if p.is_file()}:
            self._write(out, name, source, tasks, run, chosen, source)
            return
        with tempfile.TemporaryDirectory(prefix="uniseg_series.") as folder:  # the chosen series' files only
            for f in chosen.files:
                os.symlink(f.absolute(), Path(folder) / f.name)
            self._write(out, name, source, tasks, run, chosen, folder)

    def _write(
        self,
        out: Path,
        name: str,
        source: str | list[str],
        tasks: list[Task],
        run: dict[str, Any],
        chosen: Any,
        read: str | list[str],
    ) -> None:
        """:meth:`write` of the case ``source``, read from ``read`` (a folder of the ``chosen`` series' files when
        the source folder holds more)."""
        tic = time.perf_counter()
        files = [source] if isinstance(source, str) else list(source)
        series = Path(files[0]).is_dir()  # a DICOM series folder: checked once loaded
        if series:
            check_dicom_series(str(read))  # no DICOM, unreadable or missing slices: refused unread
        else:
            fits = self.check(case_header(files), tasks)  # a 2D file, a huge or singular header: refused unread
        instances = source_instances(chosen.files) if "dicom_seg" in self.output_types else []
        try:
            image = self.load({"image": read})["image"]  # (C, X, Y, Z) on the input grid
        except READ_ERRORS as err:  # voxels its header did not show to be bad: a truncated or corrupt file
            raise InputError(f"{' + '.join(files)}: unreadable ({one_line(err)}); re-export or replace it") from err
        if series:
            volume = Volume(files[0], image.shape[0], tuple(image.shape[1:]), np.asarray(image.affine))
            fits = self.check(volume, tasks, image.element_size() * image.numel())
        checked = check_values(image, files, self.nan_policy)
        loaded, case = time.perf_counter() - tic, {"image": image}
        del image  # segment frees it once resampled
        maps, meta, affine = self.segment(case, fits)
        inputs = {"case": name, "input": [source] if isinstance(source, str) else source, **checked}
        if chosen is not None:
            inputs["series_uid"] = chosen.uid
        files: dict[Path, Writer] = {}
        encoding = 0.0
        if "nifti" in self.output_types:
            tic, encoded = time.perf_counter(), {t.name: _nifti(maps[t.name], affine) for t in fits}
            if self.all:
                merged, table = merge(maps, fits)
                encoded["all_merged"] = _nifti(merged, affine)
            encoding = time.perf_counter() - tic
            files.update({inside(out, f"{name}_{s}.nii.gz"): _bytes(data) for s, data in encoded.items()})
            for t in fits:
                meta[t.name]["timings_s"] = {"load": loaded, **meta[t.name]["timings_s"], "write": encoding}
                sidecar = {**inputs, "task": t.name, **meta[t.name], **self.sidecar, **run}
                files[inside(out, f"{name}_{t.name}.json")] = _json(sidecar)
            if self.all:
                sidecar = {**inputs, "task": "all", "rule": MERGE_RULE, "labels": table, **self.sidecar, **run}
                files[inside(out, f"{name}_all_merged.json")] = _json(sidecar)
        if "dicom_seg" in self.output_types:
            try:
                seg = self._seg_files(out, name, maps, affine, fits, instances, {**inputs, **self.sidecar, **run})
            except InputError as err:  # the maps are good: keep the NIfTI files asked for, fail the case
                if not files:
                    raise
                write_group(files)
                raise InputError(f"{err} (its NIfTI maps were written, no DICOM SEG)") from err
            files.update(seg)
        write_group(files)

    def _seg_files(
        self,
        out: Path,
        name: str,
        maps: dict[str, np.ndarray],
        affine: np.ndarray,
        fits: list[Task],
        instances: list[Any],
        fields: dict[str, Any],
    ) -> dict[Path, Writer]:
        """The DICOM SEG of a case (:func:`~uniseg_monai.data.dicom_seg.build_seg`) and its sidecar, as writers."""
        from uniseg_monai import __version__

        stem = "all" if self.all else fits[0].name
        tic = time.perf_counter()
        description = f"UniSeg {stem}" + (" (" + ", ".join(t.name for t in fits) + ")" if self.all else "")
        buffer = io.BytesIO()
        try:
            seg, content = build_seg(maps, affine, fits, instances, self.seg_type, self.all, __version__, description)
            seg.save_as(buffer, enforce_file_format=True)
        except (ValueError, TypeError) as err:  # highdicom / pydicom refusing a header value; our own bugs stay
            if isinstance(err, InputError) or not raised_in(err, ("highdicom", "pydicom")):
                raise
            raise InputError(
                f"{instances[0].filename}: its series' headers make no valid DICOM SEG ({type(err).__name__} from "
                f"{'highdicom' if raised_in(err, ('highdicom',)) else 'pydicom'}: {one_line(err)}); fix that header "
                "value (re-export the series) or use --output_type nifti"
            ) from err
        timing = time.perf_counter() - tic
        new = [label for label in content["default_coded"] if (stem, label) not in self.default_coded]
        if new:  # once per run and class
            self.default_coded.update((stem, label) for label in new)
            _warn(
                f"no coded meaning (SNOMED CT) in the task registry for {', '.join(new)}: their DICOM SEG segments are "
                "coded with the default category and type 'Tissue' (README, DICOM SEG output)"
            )
        seg_name, sidecar_name = _seg_names(name, stem)
        sidecar = {**fields, "task": stem, "seg": seg_name, **content, "timings_s": {"seg_write": timing}}
        return {inside(out, seg_name): _bytes(buffer.getvalue()), inside(out, sidecar_name): _json(sidecar)}


def predict(
    input: str | Sequence[str],
    output: str,
    task: str,
    bundle: str | None = None,
    checkpoint: str | None = None,
    tta: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    overlap: float = 0.5,
    modality: str | None = None,
    skip_existing: bool = False,
    max_memory: float | None = None,
    nan_policy: str = "refuse",
    output_type: str | Sequence[str] = "nifti",
    seg_type: str = "binary",
    series: str | None = None,
    **overrides: Any,
) -> int:
    """Segment images with a trained model; returns 0, or 1 if any case failed (its file and reason on stderr,
    the other cases still written, a summary line at the end).

    Refused per case (file and reason on stderr, the other cases still run), from the files' headers before a
    voxel is read (a DICOM series once loaded): a file that is not 3D, channel files on different grids, a
    non-finite or singular affine (e.g. a zero pixdim) or a voxel size outside the task's range (its spacing / 10 to
    x 10), a case that needs more memory than ``max_memory``; once loaded, NaN / Inf voxels (see ``nan_policy``).
    A constant image (e.g. all zeros) is segmented with a warning. ``all`` without ``modality`` warns that each
    case is assumed to have the modality of every task of its channel count.

    The output folder is owned by one run at a time (``.uniseg.lock`` with its pid, removed at the end), so a
    second run into it stops naming the first's pid; a lock whose process is gone is taken over with a warning.

    Memory: only windows (sw_batch_size x C x patch) go to the device, so its memory does not grow with the
    volume; the volume is resampled, padded and the logits stitched on the CPU. Host memory per case, estimated
    before it is resampled (:func:`uniseg_monai.data.memory.case_memory`), grows linearly with the volume: loading (8
    bytes per input voxel and channel), the resampling to the task spacing (float32 grids, 28 bytes per resampled
    voxel; the input is freed once resampled), the stitched logits + weight map (float32 x classes of the pass + 1,
    summed over its tasks with ``all``), the inversion to the input grid (probabilities on the task grid in place
    of the logits, 1-2 bytes per input voxel for the labels: :class:`~uniseg_monai.data.transforms.InvertArgmaxd`),
    plus the network's windows when it runs on the CPU. A single ``--task`` needs less than ``all``.

    Args:
        input: a NIfTI / NRRD / MHA file, a DICOM series folder, a folder of such (one case per image file or
            sub-folder), or several (comma-separated). Channels of one multi-modal case are joined by ``+`` in the
            task's modality order, e.g. ``ct.nii.gz+pet.nii.gz``. A case is named after its (first) file or folder.
        output: folder for ``<case>_<task>.nii.gz`` (uint8 labels = the task's classes, input shape and affine,
            NIfTI whatever the input format) and ``<case>_<task>.json`` (labels, task, checkpoint, bundle, inputs,
            timings in seconds of ``load`` (read and checks), ``preprocess`` (reorientation, resampling,
            normalisation), ``inference`` (the sliding window; shared by the tasks of a pass), ``postprocess``
            (softmax, inverse resampling, argmax), ``write`` (merging and compressing the case's maps); with ``all``
            each task's sidecar repeats the case's ``load`` / ``write`` and its pass's (``pass`` field)
            ``preprocess`` / ``inference``, so do not add them up over tasks). Created if needed and
            checked writable before the model is loaded; refused if it holds an input. A case's files appear
            together or not at all (temporary files, renamed once all are written; those an interrupted run left
            are removed), with the mode a plain ``open()`` gives under the umask.
        task: a task of the model (its ``tasks.json``), or ``all``: every task whose channel count fits the case,
            in one sliding-window pass per spacing/normalisation (encoder once, decoder per task), plus
            ``<case>_all_merged.nii.gz`` / ``.json`` (tasks in id order, merged label = running index over their
            non-background classes, later tasks win where they overlap; the table is in the JSON). For a fine-tuned
            (one-task) model ``all`` is its task.
        bundle: bundle folder or name (``./bundles/NAME``, the installed source tree's ``bundles/NAME``, then
            ``$UNISEG_HOME/bundles/NAME``); its ``configs/inference.json`` defines pre-/post-processing and inferer.
            By default the one that runs the checkpoint's network (``uniseg_pretrain`` for a multi-task UniSeg, for a
            fine-tuned one-task model ``uniseg_finetune_vs`` if its task is ``vs``, else ``uniseg_finetune_btcv``);
            a bundle for the other kind of network is refused, naming the one to pass.
        checkpoint: model file, default ``<bundle>/models/model.pt`` (``uniseg_pretrain``'s without ``--bundle``):
            one this package wrote (it carries its network and task table, so it works from anywhere), an official
            UniSeg ``.model`` (converted on the fly), or an older state dict with ``tasks.json`` beside it; never
            unpickled code.
        tta: average the 8 mirrorings of every window (8x time).
        overwrite: replace outputs of an earlier run; without it (and without ``--skip_existing``), existing
            ``<case>_<task>`` files stop the command before any inference.
        device: ``cpu`` or ``cuda`` (default: cuda if available).
        overlap: sliding-window overlap in [0, 1).
        modality: keep only tasks with a CT, PET (CT+PET tasks), MR (any MR sequence) or e.g. T2 channel.
        skip_existing: skip (with a note) the cases whose outputs all exist (each task's map and sidecar, the merged
            ones for ``all``), run the others; a case with some outputs missing is recomputed, replacing its files
            that this ``--checkpoint`` wrote (files of another model stop the command); not with ``--overwrite``.
        max_memory: host memory (GiB) a case may need; default the memory available when the case starts
            (``MemAvailable``, else the physical memory). A case estimated to need more is refused before it is
            resampled, with the estimate (see Memory above).
        nan_policy: ``refuse`` (default): an image with NaN / Inf voxels fails with their counts; ``min``: they are
            filled with the image channel's lowest finite value (a warning, counts in the sidecar's ``nan_policy``).
        output_type: ``nifti`` (default), ``dicom_seg`` or both (``nifti,dicom_seg``). ``dicom_seg`` writes one DICOM
            Segmentation ``<case>_<task>.seg.dcm`` (``<case>_all.seg.dcm`` for ``all``) per case, its frames
            pixel-aligned with the series' instances and referencing them, plus ``<case>_<task>.seg.json`` (segment
            number -> task and class, the empty classes left out of the SEG); its inputs must be DICOM series folders
            with study, series and frame of reference UIDs (checked before loading) and it needs highdicom (``pip
            install 'uniseg-monai[dicom]'``; README, "DICOM SEG output"). A case whose SEG cannot be built once
            segmented (a header value highdicom refuses) fails, with its NIfTI files still written when asked for.
        seg_type: ``binary`` (default; one bit plane per segment, overlapping across tasks) or ``labelmap`` (one
            value per pixel, the 2024 LABELMAP SEG; with ``all`` the later task wins where tasks overlap, as in the
            merged map).
        series: the SeriesInstanceUID to read from a folder that holds several series (or a localizer beside the
            series); without it such a folder is refused, listing its series.
        overrides: other ids of ``inference.json``, e.g. ``--base_features 4 --patch_size [64,64,32]``.
    """
    if task != "all":
        check_task_name(task, "--task")
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
    if overwrite and skip_existing:
        raise UsageError("--overwrite and --skip_existing exclude each other: replace earlier outputs, or keep them")
    if nan_policy not in NAN_POLICIES:
        raise UsageError(f"--nan_policy must be one of {', '.join(NAN_POLICIES)}, got {nan_policy!r}")
    limit = None
    if max_memory is not None:
        try:
            limit = float(max_memory) * GIB
        except (TypeError, ValueError):
            limit = math.nan
        if not limit > 0 or math.isinf(limit):
            raise UsageError(f"--max_memory must be a positive number of GiB, got {max_memory!r}")
    types = [output_type] if isinstance(output_type, str) else list(output_type)
    types = [t.strip().lower() for entry in types for t in str(entry).split(",") if t.strip()]
    if not types or not set(types) <= set(OUTPUT_TYPES):
        raise UsageError(f"--output_type must be one or more of {', '.join(OUTPUT_TYPES)} (comma-separated), got "
                         f"{output_type!r}")  # fmt: skip
    types = list(dict.fromkeys(types))
    seg_type = check_seg_type(seg_type)
    if series is not None:
        series = str(series)
    cases = find_cases(input, exclude=out)
    if "dicom_seg" in types:
        require_highdicom()
        files = [src for src, _ in cases.values() if isinstance(src, list) or not Path(src).is_dir()]
        if files:
            shown = files[0] if isinstance(files[0], str) else "+".join(files[0])
            raise UsageError(
                f"--output_type dicom_seg needs DICOM series folders as input; {shown} is not one (a DICOM SEG "
                "references the series it segments): use --output_type nifti for it"
            )
    for _, files in cases.values():
        for f in files:
            if out.resolve() in (f.resolve().parent, f.absolute().parent.resolve()):
                raise UsageError(f"output folder {out} holds the input {f}: choose another one")
    settings = {"tta": bool(tta), "overlap": float(overlap), **overrides}
    outputs = {"output_types": types, "seg_type": seg_type, "series": series}
    if device:
        settings["device"] = f"$torch.device({str(device)!r})"
    created = _writable_folder(out)
    try:
        with owned(out, "uniseg predict"):
            _remove_orphans(out)
            return _predict_cases(out, cases, task, bundle, checkpoint, settings, modality, overwrite, skip_existing,
                                  limit, nan_policy, outputs)  # fmt: skip
    finally:
        _remove_empty(created)


def _predict_cases(
    out: Path,
    cases: dict[str, Case],
    task: str,
    bundle: str | None,
    checkpoint: str | None,
    settings: dict[str, Any],
    modality: str | None,
    overwrite: bool,
    skip_existing: bool,
    limit: float | None,
    nan_policy: str,
    outputs: dict[str, Any] | None = None,
) -> int:
    """:func:`predict` once its options are checked and the output folder is known to be writable; ``outputs``:
    ``output_types``, ``seg_type``, ``series``."""
    outputs = outputs or {}
    predictor = Predictor(bundle, checkpoint, task, settings, len(cases) == 1, limit, nan_policy, **outputs)
    types = predictor.output_types
    task = predictor.task
    tasks = predictor.tasks(task, modality)
    if task == "all" and not modality:
        _warn(assumed_modalities(tasks))
    names = [t.name for t in tasks] + (["all_merged"] if task == "all" else []) if "nifti" in types else []
    seg_stem = "all" if task == "all" else tasks[0].name

    def outputs_of(c: str) -> list[Path]:
        paths = [p for n in names for p in (inside(out, f"{c}_{n}.nii.gz"), inside(out, f"{c}_{n}.json"))]
        return paths + ([inside(out, n) for n in _seg_names(c, seg_stem)] if "dicom_seg" in types else [])

    own = predictor.sidecar["checkpoint"]
    found = {c: [p for p in outputs_of(c) if p.exists()] for c in cases}
    # a case is skipped when all its outputs exist and this model wrote them; another model's are refused below
    skipped = [c for c in cases if skip_existing and _complete(out, c, tasks, task == "all", types)
               and all(_written_by(p) == own for p in found[c])]  # fmt: skip
    found = {c: files for c, files in found.items() if c not in skipped}
    earlier = [p for files in found.values() for p in files]
    if skip_existing:  # a case with missing outputs is recomputed, replacing its files that this model wrote
        earlier = [p for p in earlier if _written_by(p) != own]
    if earlier and not overwrite:
        what, why, also = f"{earlier[0]} exists", "", ", --skip_existing to keep the cases whose outputs all exist"
        if skip_existing:  # a map without its sidecar cannot tell which model wrote it: it may be the user's own
            why, also = " not written by this --checkpoint, or without the sidecar that tells", ""
            other = _written_by(earlier[0])
            if other:
                what += f", written by --checkpoint {other}"
            elif not _sidecar(earlier[0]).exists():
                what += f" without its sidecar {_sidecar(earlier[0]).name}, so which model wrote it is unknown"
        raise FileExistsError(
            f"{what} ({len(earlier)} output file(s) of an earlier run in {out}{why}); pass --overwrite to replace "
            f"them (or delete them){also}, or choose another output folder"
        )
    partial = [c for c, files in found.items() if files and skip_existing]
    failed: dict[str, str] = {}
    run = {"tta": bool(settings["tta"]), "overlap": float(settings["overlap"])}
    for name, (source, _) in progress_bar(cases.items(), desc="uniseg predict", unit="case"):
        if name in skipped:
            tqdm.write(f"uniseg predict: {name}: skipped, its outputs exist (--skip_existing)", file=sys.stderr)
            continue
        if name in partial:
            tqdm.write(f"uniseg predict: {name}: recomputed, some of its outputs are missing (--skip_existing)",
                       file=sys.stderr)  # fmt: skip
        try:
            predictor.write(out, name, source, tasks, run)
        except USER_ERRORS as err:  # one bad case (its files, header or values) must not stop the others; a bug does
            failed[name] = f"{type(err).__name__}: {str(err).strip()}"
            if debugging():
                traceback.print_exception(err)
            tqdm.write(f"uniseg predict: {name} ({source}) failed: {failed[name]}", file=sys.stderr)
    written = len(cases) - len(failed) - len(skipped)
    print(f"uniseg predict: {written} case(s) written to {out}"
          + (f", {len(skipped)} skipped (outputs exist)" if skipped else "")
          + f", {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))  # fmt: skip
    return int(bool(failed))
