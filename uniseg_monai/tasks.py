"""The task registry: the one place where task facts live.

A task is a dataset with its own label set. Its integer ``id`` is the network's task index (the universal
prompt channel), so the paper's upstream tasks keep the paper's ids 0-10. Spacings are in MONAI axis order
(x, y, z). Users add or override tasks without code through the ``"tasks"`` object of a datalist.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from uniseg_monai.core.atomic import write_text_atomic
from uniseg_monai.core.errors import UniSegError
from uniseg_monai.core.json_files import read_json

NORMALIZATIONS = ("ct", "zscore", "zscore_nonzero")
DEFAULT_CT_WINDOW = (-325.0, 325.0)
SPACING_MM = (0.01, 100.0)  # a sane target spacing (mm): below, a header in m or a typo; above, no image is left
_ABDOMEN_CT = {"modalities": ["CT"], "spacing": [1.5, 1.5, 3.0], "normalization": ["ct"]}
_UPSTREAM_CT = {"paper": "upstream", **_ABDOMEN_CT}

# name -> task fields; registry flags (not task fields): "paper" marks the paper's 11 upstream (pretraining) tasks,
# ids 0-10, and its two downstream (transfer) tasks; "paper_dice" the paper's Dice in % where the facts file has it
BUILTIN_TASKS: dict[str, dict[str, Any]] = {
    "liver": {"id": 0, **_UPSTREAM_CT, "labels": ["background", "liver", "liver tumour"]},
    "kidney": {"id": 1, **_UPSTREAM_CT, "labels": ["background", "kidney", "kidney tumour"]},
    "hepatic_vessel": {"id": 2, **_UPSTREAM_CT, "labels": ["background", "hepatic vessel", "hepatic tumour"]},
    "pancreas": {"id": 3, **_UPSTREAM_CT, "labels": ["background", "pancreas", "pancreas tumour"]},
    "colon": {"id": 4, **_UPSTREAM_CT, "labels": ["background", "colon tumour"]},
    "lung": {"id": 5, **_UPSTREAM_CT, "labels": ["background", "lung tumour"]},
    "spleen": {"id": 6, **_UPSTREAM_CT, "labels": ["background", "spleen"]},
    "verse20": {
        "id": 7,
        "paper": "upstream",
        "modalities": ["CT"],
        "labels": ["background", "vertebrae"],
        "spacing": [2.0, 2.0, 4.0],
        "normalization": ["ct"],
        "label_map": {str(v): 1 for v in range(1, 29)},  # all vertebrae (C1 .. L6, T13) -> 1
    },
    "prostate": {
        "id": 8,
        "paper": "upstream",
        "modalities": ["T2"],
        "labels": ["background", "prostate"],
        "spacing": [1.5, 1.5, 3.0],
        "normalization": ["zscore"],
        "label_map": {"1": 1, "2": 1},  # MSD peripheral + transition zone -> whole prostate
    },
    "brats21": {
        "id": 9,
        "paper": "upstream",
        "modalities": ["T1", "T1ce", "T2", "FLAIR"],
        "labels": ["background", "edema", "non-enhancing/necrotic tumour", "enhancing tumour"],
        "spacing": [1.0, 1.0, 1.0],
        "normalization": ["zscore_nonzero"] * 4,
        "label_map": {"2": 1, "1": 2, "4": 3},
    },
    "autopet": {
        "id": 10,
        "paper": "upstream",
        "modalities": ["CT", "PET"],
        "labels": ["background", "lesion"],
        "spacing": [4.0, 4.0, 8.0],
        "normalization": ["ct", "zscore"],
    },
    "btcv": {
        "id": 11,
        "paper": "downstream",
        "paper_dice": 84.6,
        **_ABDOMEN_CT,
        "labels": [
            "background",
            "spleen",
            "right kidney",
            "left kidney",
            "gallbladder",
            "esophagus",
            "liver",
            "stomach",
            "aorta",
            "inferior vena cava",
            "portal and splenic vein",
            "pancreas",
            "right adrenal gland",
            "left adrenal gland",
        ],
        # column names of the paper's Table 3
        "short_labels": ["bg", "Sp", "RKi", "LKi", "Gb", "Es", "Li", "St", "Ao", "IVC", "PSV", "Pa", "RAG", "LAG"],
    },
    "vs": {
        "id": 12,
        "paper": "downstream",
        "paper_dice": 92.9,
        "modalities": ["T1ce"],
        "labels": ["background", "vestibular schwannoma"],
        "short_labels": ["bg", "VS"],
        "spacing": [0.5, 0.5, 1.5],
        "normalization": ["zscore"],
    },
}


# Coded meaning of each class for DICOM SEG (``uniseg predict --output_type dicom_seg``): SNOMED CT (SCT) codes of the
# DICOM standard's CID 7150 (segmentation property categories) and CID 7151 (types), each equal to pydicom's
# ``codes.SCT`` constant of that name (tests/test_dicom_seg.py checks it), an anatomic region where the type alone
# does not say where (a tumour), and a display colour (sRGB; a presentation choice, not a code).
SCT_CODES: dict[str, tuple[str, str]] = {  # pydicom codes.SCT name -> (code value, code meaning)
    "Tissue": ("85756007", "Tissue"),
    "AnatomicalStructure": ("91723000", "Anatomical Structure"),
    "MorphologicallyAbnormalStructure": ("49755003", "Morphologically Abnormal Structure"),
    "Liver": ("10200004", "Liver"),
    "Kidney": ("64033007", "Kidney"),
    "Pancreas": ("15776009", "Pancreas"),
    "Colon": ("71854001", "Colon"),
    "Lung": ("39607008", "Lung"),
    "Spleen": ("78961009", "Spleen"),
    "Vertebra": ("51282000", "Vertebra"),
    "Prostate": ("41216001", "Prostate"),
    "Brain": ("12738006", "Brain"),
    "Gallbladder": ("28231008", "Gallbladder"),
    "Esophagus": ("32849002", "Esophagus"),
    "Stomach": ("69695003", "Stomach"),
    "Aorta": ("15825003", "Aorta"),
    "InferiorVenaCava": ("64131007", "Inferior vena cava"),
    "AdrenalGland": ("23451007", "Adrenal gland"),
    "BloodVessel": ("59820001", "Blood Vessel"),
    "Neoplasm": ("108369006", "Neoplasm"),
    "Edema": ("79654002", "Edema"),
    "Lesion": ("52988006", "Lesion"),
}


@dataclass(frozen=True)
class ClassCode:
    """A class's coded meaning: ``category`` and ``type`` (names of :data:`SCT_CODES`), optional anatomic ``region``
    and the display ``color`` (sRGB 0-255)."""

    category: str
    type: str
    color: tuple[int, int, int]
    region: str | None = None


# the documented default for a class without a coded meaning (a user's task, or a class the standard has no code for)
DEFAULT_CLASS_CODE = ClassCode("Tissue", "Tissue", (128, 174, 128))


def _organ(kind: str, color: tuple[int, int, int]) -> ClassCode:
    return ClassCode("AnatomicalStructure", kind, color)


def _tumour(region: str | None, color: tuple[int, int, int] = (255, 255, 0), kind: str = "Neoplasm") -> ClassCode:
    return ClassCode("MorphologicallyAbnormalStructure", kind, color, region)


# task -> class label -> coded meaning; a class not listed gets DEFAULT_CLASS_CODE (here on purpose, no code fits:
# btcv's "portal and splenic vein" (two veins in one class), brats21's "non-enhancing/necrotic tumour")
CLASS_CODES: dict[str, dict[str, ClassCode]] = {
    "liver": {"liver": _organ("Liver", (221, 130, 101)), "liver tumour": _tumour("Liver")},
    "kidney": {"kidney": _organ("Kidney", (185, 102, 83)), "kidney tumour": _tumour("Kidney")},
    "hepatic_vessel": {
        "hepatic vessel": ClassCode("AnatomicalStructure", "BloodVessel", (0, 151, 206), "Liver"),
        "hepatic tumour": _tumour("Liver"),
    },
    "pancreas": {"pancreas": _organ("Pancreas", (249, 180, 111)), "pancreas tumour": _tumour("Pancreas")},
    "colon": {"colon tumour": _tumour("Colon")},
    "lung": {"lung tumour": _tumour("Lung")},
    "spleen": {"spleen": _organ("Spleen", (157, 108, 162))},
    "verse20": {"vertebrae": _organ("Vertebra", (241, 214, 145))},
    "prostate": {"prostate": _organ("Prostate", (230, 158, 140))},
    "brats21": {
        "edema": _tumour("Brain", (0, 255, 0), "Edema"),
        "enhancing tumour": _tumour("Brain", (255, 0, 0)),
    },
    "autopet": {"lesion": _tumour(None, (255, 0, 0), "Lesion")},
    "btcv": {
        "spleen": _organ("Spleen", (157, 108, 162)),
        "right kidney": _organ("Kidney", (185, 102, 83)),
        "left kidney": _organ("Kidney", (185, 102, 83)),
        "gallbladder": _organ("Gallbladder", (139, 150, 98)),
        "esophagus": _organ("Esophagus", (211, 171, 143)),
        "liver": _organ("Liver", (221, 130, 101)),
        "stomach": _organ("Stomach", (216, 132, 105)),
        "aorta": _organ("Aorta", (224, 97, 76)),
        "inferior vena cava": _organ("InferiorVenaCava", (0, 151, 206)),
        "pancreas": _organ("Pancreas", (249, 180, 111)),
        "right adrenal gland": _organ("AdrenalGland", (244, 217, 154)),
        "left adrenal gland": _organ("AdrenalGland", (244, 217, 154)),
    },
    "vs": {"vestibular schwannoma": _tumour(None)},
}


def class_code(task: Task, k: int) -> ClassCode | None:
    """The coded meaning of class ``k`` of ``task``: the registry's (:data:`CLASS_CODES`, by task name and class
    label), else None (the caller uses :data:`DEFAULT_CLASS_CODE` and says so)."""
    return CLASS_CODES.get(task.name, {}).get(task.labels[k])


FLAGS = ("paper", "paper_dice")  # registry flags of BUILTIN_TASKS, not task fields
# task names become parts of file names (``<case>_<task>.nii.gz``, ``models_<task>``): identifiers only
TASK_NAME_LENGTH = 64
TASK_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{TASK_NAME_LENGTH - 1}}}")
RESERVED_TASK_NAMES = ("all", "all_merged")  # ``--task all`` and predict's ``<case>_all_merged`` map (any case)
MAX_TASK_ID = 1023  # the network keeps one task slot (prompt) per id up to the largest: a larger id is a typo
TASK_NAME_RULE = (
    f"use letters, digits, '_', '.' and '-', starting with a letter or digit, at most {TASK_NAME_LENGTH} characters, "
    f"not {' or '.join(map(repr, RESERVED_TASK_NAMES))} in any letter case (task names become parts of file "
    "names)"
)


class TaskError(UniSegError, ValueError):
    """A task definition or reference that cannot be used."""


def check_task_name(name: Any, where: str = "") -> str:
    """``name`` if it is a task name by :data:`TASK_NAME_RULE`; else a :class:`TaskError` naming ``where`` (the
    file, entry or option the name came from) and the rule."""
    if isinstance(name, str) and TASK_NAME.fullmatch(name) and name.lower() not in RESERVED_TASK_NAMES:
        return name
    raise TaskError(f"{where + ': ' if where else ''}task name {name!r}: {TASK_NAME_RULE}")


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _is_normalization(value: Any) -> bool:
    return isinstance(value, (str, Mapping))


def _is_raw_label(key: Any) -> bool:
    """A ``label_map`` key: a raw label value, an integer >= 0 (a JSON object's keys are strings: ``"2"``)."""
    return (_is_integer(key) and key >= 0) or (isinstance(key, str) and key.isascii() and key.isdigit())


def _list(spec: Mapping[str, Any], key: str, where: str, ok: Any, what: str, length: int = 0) -> tuple:
    """``spec[key]`` as a tuple if it is a list (of ``length`` items, if given) whose items are all ``ok``; else a
    :class:`TaskError` naming the task and the key (a string is no list: ``"liver"`` is not 5 labels)."""
    value = spec[key]
    if not isinstance(value, (list, tuple)) or not all(map(ok, value)) or (length and len(value) != length):
        raise TaskError(f"{where}: {key} must be {what}, got {value!r:.200}")
    return tuple(value)


@dataclass(frozen=True)
class Normalization:
    """Per-channel intensity normalisation: ``ct`` (clip to window, scale to [0, 1]), ``zscore`` (whole
    image) or ``zscore_nonzero`` (statistics and output inside the non-zero mask)."""

    kind: str
    window: tuple[float, float] = DEFAULT_CT_WINDOW

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any], where: str) -> Normalization:
        if isinstance(spec, str):
            spec = {"type": spec}
        kind = spec.get("type")
        if kind not in NORMALIZATIONS:
            raise TaskError(f"{where}: normalization {spec!r} unknown; use one of {list(NORMALIZATIONS)}")
        window = spec.get("window", DEFAULT_CT_WINDOW)
        if (
            not isinstance(window, (list, tuple))
            or len(window) != 2
            or not all(map(_is_number, window))
            or not (window[0] < window[1])
        ):
            raise TaskError(f"{where}: CT window must be [low, high] with low < high, got {spec.get('window')!r}")
        return cls(kind, (float(window[0]), float(window[1])))

    def to_json(self) -> str | dict[str, Any]:
        if self.kind == "ct" and self.window != DEFAULT_CT_WINDOW:
            return {"type": "ct", "window": list(self.window)}
        return self.kind


@dataclass(frozen=True)
class Task:
    """One segmentation task: channels in ``modalities`` order, classes ``labels`` (incl. background);
    ``short_labels`` optionally names the classes in table columns (e.g. the paper's "Sp", "RKi", ...);
    ``nsd_tolerance`` (mm) the boundary tolerance of the normalised surface Dice (default: the task's coarsest
    spacing, one voxel of its grid)."""

    name: str
    id: int
    modalities: tuple[str, ...]
    labels: tuple[str, ...]
    spacing: tuple[float, float, float]
    normalization: tuple[Normalization, ...]
    label_map: dict[int, int] = field(default_factory=dict)
    short_labels: tuple[str, ...] = ()
    nsd_tolerance: float | None = None

    def __post_init__(self) -> None:
        check_task_name(self.name)  # every task, wherever it is defined (code, datalist, model file, tasks.json)

    @property
    def surface_tolerance(self) -> float:
        """The NSD tolerance in mm: ``nsd_tolerance``, else the coarsest target spacing."""
        return self.nsd_tolerance if self.nsd_tolerance is not None else max(self.spacing)

    @property
    def column_names(self) -> tuple[str, ...]:
        """Class names for table columns: ``short_labels`` if given, else ``labels``."""
        return self.short_labels or self.labels

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def in_channels(self) -> int:
        return len(self.modalities)

    @classmethod
    def parse(cls, name: str, spec: Mapping[str, Any]) -> Task:
        """The task ``name`` of the task keys ``spec``; a :class:`TaskError` naming the task and the key for a key
        that is unknown, missing, of the wrong kind (a string where a list belongs, text where a number does) or
        out of range."""
        where = f"task {name!r}"
        if not isinstance(spec, Mapping):
            raise TaskError(
                f'{where} must be a task definition, an object such as {{"id": 0, "modalities": ["CT"], "labels": '
                f'["background", "liver"], "spacing": [1.5, 1.5, 3]}}, got {spec!r:.80}'
            )
        known = {"id", "modalities", "labels", "spacing", "normalization", "label_map", "short_labels", "nsd_tolerance"}
        unknown = set(spec) - known
        if unknown:
            raise TaskError(f"{where}: unknown keys {sorted(unknown)}")
        missing = {"id", "modalities", "labels", "spacing"} - set(spec)
        if missing:
            raise TaskError(f"{where}: missing {sorted(missing)}")
        task_id = spec["id"]
        if not _is_integer(task_id) or not 0 <= task_id <= MAX_TASK_ID:
            raise TaskError(f"{where}: id must be an integer from 0 to {MAX_TASK_ID}, got {task_id!r}")
        modalities = _list(spec, "modalities", where, _is_text, 'a list of modality names, e.g. ["CT"]')
        labels = _list(spec, "labels", where, _is_text, "a list of class names, background first")
        spacing = _list(spec, "spacing", where, _is_number, "3 positive numbers (x, y, z) in mm", 3)
        if spec.get("normalization") is None:
            norm_spec: tuple = tuple("ct" if m.upper() == "CT" else "zscore" for m in modalities)
        else:
            norm_spec = _list(spec, "normalization", where, _is_normalization, "a list, one entry per modality")
        normalization = tuple(Normalization.parse(n, where) for n in norm_spec)
        label_map = spec.get("label_map") or {}
        if (
            not isinstance(label_map, Mapping)
            or not all(map(_is_raw_label, label_map))
            or not all(_is_integer(v) for v in label_map.values())
        ):
            raise TaskError(
                f'{where}: label_map must map raw label values to class indices, both integers (e.g. {{"2": 1}}), '
                f"got {spec.get('label_map')!r:.200}"
            )
        label_map = {int(k): v for k, v in label_map.items()}
        short_labels = (
            _list(spec, "short_labels", where, _is_text, "a list of class names") if spec.get("short_labels") else ()
        )
        tolerance = spec.get("nsd_tolerance")
        if tolerance is not None and (not _is_number(tolerance) or not 0 < tolerance < math.inf):
            raise TaskError(f"{where}: nsd_tolerance must be a positive number of mm, got {tolerance!r}")
        if len(modalities) not in (1, 2, 4):
            raise TaskError(f"{where}: {len(modalities)} modalities; UniSeg has stems for 1, 2 or 4 channels")
        if len(labels) < 2:
            raise TaskError(f"{where}: labels must list background and at least one class, got {list(labels)}")
        low, high = SPACING_MM
        if not all(low <= s <= high for s in spacing):  # NaN fails too
            raise TaskError(
                f"{where}: spacing must be 3 positive numbers (x, y, z) in mm, each {low:g}-{high:g}, got "
                f"{spec['spacing']}"
            )
        if len(normalization) != len(modalities):
            raise TaskError(f"{where}: {len(normalization)} normalization entries for {len(modalities)} modalities")
        bad = {k: v for k, v in label_map.items() if not 0 <= v < len(labels)}
        if bad:
            raise TaskError(f"{where}: label_map targets {bad} outside the {len(labels)} classes")
        if short_labels and len(short_labels) != len(labels):
            raise TaskError(f"{where}: {len(short_labels)} short_labels for {len(labels)} labels")
        tolerance = None if tolerance is None else float(tolerance)
        spacing = tuple(float(s) for s in spacing)
        return cls(name, task_id, modalities, labels, spacing, normalization, label_map, short_labels, tolerance)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["normalization"] = [n.to_json() for n in self.normalization]
        out["label_map"] = {str(k): v for k, v in self.label_map.items()}
        out.pop("name")
        if not self.short_labels:
            out.pop("short_labels")
        if self.nsd_tolerance is None:
            out.pop("nsd_tolerance")
        return out


def model_bound(task: Task) -> dict[str, Any]:
    """What a trained network and its pre-processing are fit to: task id, channel and class counts, target
    spacing and normalisation (JSON values)."""
    return {
        "id": task.id,
        "channels": task.in_channels,
        "classes": task.num_classes,
        "spacing": list(task.spacing),
        "normalization": [n.to_json() for n in task.normalization],
    }


class TaskRegistry(Mapping[str, Task]):
    """Tasks by name; ``TaskRegistry()`` holds the built-in ones, :meth:`extended` adds a datalist's."""

    def __init__(self, tasks: Iterable[Task] | None = None) -> None:
        if tasks is None:
            tasks = (Task.parse(n, {k: v for k, v in s.items() if k not in FLAGS}) for n, s in BUILTIN_TASKS.items())
        self._tasks = {t.name: t for t in tasks}
        # task name -> the datalist that defines it, for a trained model's tasks (:meth:`with_definitions`)
        self.not_in_model: dict[str, str] = {}
        folded: dict[str, str] = {}
        for name in self._tasks:
            if (other := folded.setdefault(name.lower(), name)) != name:
                raise TaskError(
                    f"tasks {other!r} and {name!r} differ only in letter case: their files (<case>_<task>.nii.gz) "
                    "collide on case-insensitive file systems; rename one"
                )

    def __getitem__(self, name: str) -> Task:
        check_task_name(name)  # no task has such a name: say why, not only that it is unknown
        try:
            return self._tasks[name]
        except KeyError:
            if name in self.not_in_model:
                raise TaskError(
                    f"task {name!r} is defined in {self.not_in_model[name]} but the model was not trained on it "
                    f"(its tasks: {sorted(self._tasks)}); a trained model knows its tasks by the names it was trained "
                    "with: use that name (rename the task back), or teach the model the task with `uniseg add-task`"
                ) from None
            raise TaskError(
                f"unknown task {name!r}; known tasks: {sorted(self._tasks)} (use one of them, or define it in the "
                'datalist\'s "tasks")'
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self):
        return iter(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)

    def extended(self, specs: Mapping[str, Mapping[str, Any]]) -> TaskRegistry:
        """A registry with ``specs`` (a datalist's ``"tasks"``) added; a known name is overridden field by field.

        A new task without ``id`` gets the next free one (after every id already in use).
        """
        tasks = dict(self._tasks)
        for name, spec in specs.items():
            base = tasks[name].to_json() if name in tasks else {}
            merged = {**base, **spec}
            if "id" not in merged:
                merged["id"] = 1 + max((t.id for t in tasks.values()), default=-1)
            tasks[name] = Task.parse(name, merged)
        return TaskRegistry(tasks.values())

    def with_definitions(self, specs: Mapping[str, Mapping[str, Any]], source: str) -> TaskRegistry:
        """This registry (a trained model's tasks) with ``specs`` (the ``"tasks"`` of the datalist ``source``) applied
        to the tasks it holds, key by key as :meth:`extended` (tasks it lacks are left out): the datalist's
        ``label_map``, class names, ``short_labels`` and ``nsd_tolerance`` win. What the network and its
        pre-processing were fit to (:func:`model_bound`) must stay: a :class:`TaskError` shows both values."""
        known = {name: spec for name, spec in specs.items() if name in self}
        try:
            merged = self.extended(known)
        except TaskError as err:
            raise TaskError(f"{source}: {err}") from None
        changed = [
            f"task {name!r} {key} {value} there, {model_bound(self[name])[key]} in the model"
            for name in known
            for key, value in model_bound(merged[name]).items()
            if value != model_bound(self[name])[key]
        ]
        if changed:
            raise TaskError(
                f"{source}: {'; '.join(changed)}: a trained model keeps its task ids, channel and class counts, "
                'spacing and normalisation; remove those keys from the datalist\'s "tasks" to evaluate the model as '
                "trained, or train a model with them"
            )
        merged.not_in_model = {name: source for name in specs if name not in self}
        return merged

    def subset(self, names: Iterable[str]) -> TaskRegistry:
        """The named tasks only; their ids must be distinct."""
        chosen = TaskRegistry([self[n] for n in dict.fromkeys(names)])
        chosen.check_distinct_ids('give one of them another "id" in the datalist\'s "tasks"')
        return chosen

    def check_distinct_ids(self, fix: str) -> None:
        """A :class:`TaskError` (ending in ``fix``) if two tasks share an id (one network task slot, two label
        meanings)."""
        by_id: dict[int, str] = {}
        for task in self._tasks.values():
            if task.id in by_id:
                raise TaskError(f"tasks {by_id[task.id]!r} and {task.name!r} share id {task.id}; {fix}")
            by_id[task.id] = task.name

    @property
    def names(self) -> list[str]:
        """Task names in id order (a MONAI Label ``displayable_configs`` drop-down)."""
        return [t.name for t in sorted(self._tasks.values(), key=lambda t: t.id)]

    def by_id(self, task_id: int) -> Task:
        for task in self._tasks.values():
            if task.id == task_id:
                return task
        raise TaskError(f"no task with id {task_id}; ids: {sorted(t.id for t in self._tasks.values())}")

    @property
    def num_tasks(self) -> int:
        """Network task slots needed: max id + 1."""
        return 1 + max(t.id for t in self._tasks.values())

    @property
    def num_classes(self) -> int:
        """Network output channels needed: max classes over the tasks."""
        return max(t.num_classes for t in self._tasks.values())

    @property
    def classes_per_task(self) -> list[int]:
        """Classes (incl. background) indexed by task id; 0 for ids no task uses."""
        out = [0] * self.num_tasks
        for t in self._tasks.values():
            out[t.id] = t.num_classes
        return out

    def to_json(self) -> dict[str, dict[str, Any]]:
        return {t.name: t.to_json() for t in sorted(self._tasks.values(), key=lambda t: t.id)}

    def table(self) -> str:
        """A plain-text table of the tasks, by id."""
        rows = [("id", "name", "channels", "classes", "spacing (x,y,z)", "normalization", "labels")]
        for t in sorted(self._tasks.values(), key=lambda t: t.id):
            norm = ",".join(n.kind if n.kind != "ct" else f"ct{list(n.window)}" for n in t.normalization)
            rows.append(
                (
                    str(t.id),
                    t.name,
                    "+".join(t.modalities),
                    str(t.num_classes),
                    "x".join(f"{s:g}" for s in t.spacing),
                    norm,
                    ", ".join(t.labels[1:]),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)


PAPER_UPSTREAM_TASKS = tuple(name for name, spec in BUILTIN_TASKS.items() if spec["paper"] == "upstream")
PAPER_DICE = {name: spec["paper_dice"] for name, spec in BUILTIN_TASKS.items() if "paper_dice" in spec}  # Table 3
PAPER_UPSTREAM_MEAN_DICE = 78.2  # Table 2: mean Dice over the 11 upstream tasks (no per-task numbers in our facts)
MODEL_TASKS_FILE = "tasks.json"


def save_model_tasks(registry: TaskRegistry, ckpt_dir: str | Path) -> Path:
    """Write the tasks a model is trained on to ``<ckpt_dir>/tasks.json`` (beside ``model.pt``).

    An existing file must describe the same tasks (a resumed run); otherwise it is left alone and an error
    raised, so a model's task table is never silently replaced.
    """
    path = Path(ckpt_dir) / MODEL_TASKS_FILE
    text = json.dumps({"tasks": registry.to_json()}, indent=2) + "\n"
    if path.exists():
        difference = first_difference(load_model_tasks(path.parent), registry)
        if difference:
            raise TaskError(
                f"{path} describes other tasks than this run's datalist ({difference}); use another --ckpt_dir for a "
                "new task set"
            )
        return path
    write_text_atomic(path, text)
    return path


def first_difference(saved: TaskRegistry, datalist: TaskRegistry) -> str:
    """The first task key in which ``datalist``'s tasks differ from ``saved`` ones, showing both values; ``""``
    when they are the same."""
    old, new = saved.to_json(), datalist.to_json()
    for name in sorted(set(old) | set(new)):
        if name not in old or name not in new:
            return f"task {name!r} only {'in the datalist' if name in new else 'there'}"
        for key in sorted(set(old[name]) | set(new[name])):
            if old[name].get(key) != new[name].get(key):
                return f"task {name!r} {key}: {old[name].get(key)} there, {new[name].get(key)} in the datalist"
    return ""


def load_model_tasks(ckpt_dir: str | Path) -> TaskRegistry:
    """The tasks of the model in ``ckpt_dir`` (its ``tasks.json``, written by training or the converter)."""
    path = Path(ckpt_dir) / MODEL_TASKS_FILE
    try:
        document = read_json(path)
    except FileNotFoundError:
        raise TaskError(
            f"{path} not found: a model folder needs model.pt and the tasks.json its training wrote"
        ) from None
    except json.JSONDecodeError as err:
        raise TaskError(f"{path}: not valid JSON ({err}); {TASK_TABLE_FORM}") from None
    if not isinstance(document, dict) or "tasks" not in document:
        got = f"an object with keys {sorted(document)[:5]}" if isinstance(document, dict) else _kind(document)
        hint = ' (it looks like the table itself: wrap it in {"tasks": ...})' if _looks_like_table(document) else ""
        raise TaskError(f'{path}: must be an object with a "tasks" key, got {got}{hint}; {TASK_TABLE_FORM}')
    return task_table(document["tasks"], str(path))


TASK_TABLE_FORM = (
    'a model\'s task table is {"tasks": {"NAME": {"id": 0, "modalities": ["CT"], "labels": ["background", "organ"], '
    '"spacing": [1.5, 1.5, 3]}, ...}}'
)


def _kind(value: Any) -> str:
    """What a JSON value is, for a message: ``a list [1, 2]``, ``a str 'liver'``, ``an empty object``."""
    if isinstance(value, Mapping) and not value:
        return "an empty object"
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return f"{'an' if type(value).__name__[0] in 'aeiou' else 'a'} {type(value).__name__} {shown}"


def _looks_like_table(value: Any) -> bool:
    return (
        isinstance(value, Mapping) and bool(value) and all(isinstance(v, Mapping) and "id" in v for v in value.values())
    )


def task_table(specs: Any, where: str) -> TaskRegistry:
    """The tasks of a model's task table ``specs`` (the ``"tasks"`` of a model file or ``tasks.json``): task names
    mapped to task definitions with distinct ids; else a :class:`TaskError` naming ``where`` (the file)."""
    if not isinstance(specs, Mapping) or not specs:
        raise TaskError(
            f'{where}: "tasks" must map task names to task definitions, got {_kind(specs)}; {TASK_TABLE_FORM}'
        )
    try:
        registry = TaskRegistry(Task.parse(name, spec) for name, spec in specs.items())
        registry.check_distinct_ids("a model's task table gives each task its own id; re-save the model")
    except (TaskError, TypeError, ValueError, AttributeError, KeyError) as err:
        raise TaskError(f"{where}: {err}") from None
    return registry


def resolve_task(item: Mapping[str, Any], registry: TaskRegistry, default: str = "") -> Task:
    """The task of a data item: its own ``"task"`` (a name), else ``default``, else the registry's only task.

    A ``"task"`` that is not a string (MONAI Label's unchosen drop-down list) counts as missing. With neither,
    the error names the item's image and the tasks to choose from.
    """
    name = item.get("task")
    name = name if isinstance(name, str) and name else default
    if not name and len(registry) == 1:
        name = next(iter(registry))
    if not name:
        raise TaskError(f"{item.get('image', 'item')}: no task given; choose one of {registry.names} (key 'task')")
    return registry[name]
