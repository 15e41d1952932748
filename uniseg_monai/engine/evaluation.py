"""Per-task Dice / HD95 / NSD: the validation key metric and the evaluation report (the paper's Table 2 layout).

Empty masks follow one convention per class and case (nnU-Net's evaluation and Metrics Reloaded): reference and
prediction both empty -> excluded from every mean (NaN) and counted as ``neither``; exactly one empty (``missed``:
reference only, ``false_positive``: prediction only) -> Dice 0, NSD 0, HD95 = the volume's diagonal in mm (the
worst distance the volume allows); both present (``both``) -> the computed values. The report counts the groups.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.data import MetaTensor
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice
from monai.networks.utils import one_hot

from uniseg_monai.data.transforms import image_stem
from uniseg_monai.tasks import TaskRegistry

GROUPS = ("both", "missed", "false_positive", "neither")  # reference / prediction non-empty: yes-yes, yes-no, ...


@dataclass
class CaseScore:
    """One evaluated case, per foreground class: its group (:data:`GROUPS`), Dice, and if computed HD95 (mm) and
    NSD (the module docstring says what empty masks give)."""

    case: str
    task: str
    dice: list[float]
    hd95: list[float]
    nsd: list[float] = dataclasses.field(default_factory=list)
    groups: list[str] = dataclasses.field(default_factory=list)


def case_name(item: dict[str, Any]) -> str:
    """The case name :class:`~uniseg_monai.data.transforms.RecordTaskd` recorded, else the image file stem."""
    meta = getattr(item["image"], "meta", {})
    return meta.get("case") or image_stem(meta.get("filename_or_obj", ""))


def score_case(
    pred: torch.Tensor, label: torch.Tensor, classes: int, hd95: bool, nsd_tolerance: float | None = None
) -> CaseScore:
    """pred, label (1, X, Y, Z) label maps of one task with ``classes`` classes -> Dice, HD95 (if ``hd95``) and NSD
    (if ``nsd_tolerance``, in mm) per foreground class, with the groups of the module docstring; distances in mm
    from the label's ``pixdim`` (voxels for a plain tensor). ``case``/``task`` are left empty."""
    p = one_hot(pred[None].long(), classes)
    y = one_hot(label[None].long().to(pred.device), classes)
    in_ref, in_pred = y[0, 1:].flatten(1).any(1).tolist(), p[0, 1:].flatten(1).any(1).tolist()
    groups = [GROUPS[2 * (not r) + (not q)] for r, q in zip(in_ref, in_pred)]
    dice = compute_dice(p, y, include_background=False, ignore_empty=False)[0].tolist()
    dice = [float("nan") if g == "neither" else 0.0 if g != "both" else d for g, d in zip(groups, dice)]
    spacing = [float(v) for v in label.pixdim] if isinstance(label, MetaTensor) else [1.0] * (label.ndim - 1)
    worst = math.dist([0.0] * len(spacing), [n * s for n, s in zip(label.shape[1:], spacing)])
    score = CaseScore("", "", dice, [], [], groups)
    with warnings.catch_warnings():  # MONAI warns for every empty class; the groups decide those
        warnings.simplefilter("ignore")
        if hd95:
            dist_mm = compute_hausdorff_distance(p, y, include_background=False, percentile=95, spacing=spacing)[0]
            score.hd95 = [_by_group(g, float(v), worst) for g, v in zip(groups, dist_mm.tolist())]
        if nsd_tolerance:
            thresholds = [float(nsd_tolerance)] * (classes - 1)
            nsd = compute_surface_dice(p, y, thresholds, include_background=False, spacing=spacing)[0]
            score.nsd = [_by_group(g, float(v), 0.0) for g, v in zip(groups, nsd.tolist())]
    return score


def _by_group(group: str, value: float, one_empty: float) -> float:
    return value if group == "both" else float("nan") if group == "neither" else one_empty


class TaskDice(Metric):
    """Mean Dice over tasks (each task: mean over its foreground classes of the per-class mean over cases).

    Attached to a MONAI evaluator with ``decollate=True``: for every item it reads the post-processed label maps
    ``pred`` (from ``engine.state.output``) and ``label_key`` (1, X, Y, Z) (output or batch) and the task from
    ``engine.state.batch``. Cases of all ranks are gathered. After ``compute()``, :attr:`cases` holds the
    :class:`CaseScore` list (used by :class:`EvaluationReport`).

    Args:
        registry: the tasks (names, ids, label names, NSD tolerances).
        hd95: also compute the 95th-percentile Hausdorff distance in mm (slower; for evaluation).
        nsd: also compute the normalised surface Dice at each task's ``surface_tolerance`` (mm).
        label_key: output key of the reference label map.
    """

    def __init__(self, registry: TaskRegistry, hd95: bool = False, nsd: bool = False, label_key: str = "label") -> None:
        self.registry = registry
        self.hd95 = hd95
        self.nsd = nsd
        self.label_key = label_key
        self.cases: list[CaseScore] = []
        super().__init__(output_transform=lambda x: x)

    def reset(self) -> None:
        self._local: list[CaseScore] = []

    def update(self, output: Any) -> None:  # items are read in iteration_completed
        raise NotImplementedError

    def iteration_completed(self, engine: Engine) -> None:
        for item, out in zip(engine.state.batch, engine.state.output):
            task = self.registry.by_id(int(item["task_id"]))
            reference = out[self.label_key] if self.label_key in out else item[self.label_key]
            tolerance = task.surface_tolerance if self.nsd else None
            score = score_case(out["pred"], reference, task.num_classes, self.hd95, tolerance)
            score.case, score.task = case_name(item), task.name
            self._local.append(score)

    def completed(self, engine: Engine, name: str) -> None:
        """Store the mean under ``name`` and each task's Dice under ``name/<task>`` (logged by StatsHandler)."""
        engine.state.metrics[name] = self.compute()
        for task, result in task_summary(self.cases, self.registry)["tasks"].items():
            engine.state.metrics[f"{name}/{task}"] = result["dice"]

    def compute(self) -> float:
        cases = self._local
        if dist.is_available() and dist.is_initialized():
            gathered: list[list[CaseScore]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(gathered, cases)
            cases = [c for part in gathered for c in part]
        self.cases = sorted(cases, key=lambda c: (c.task, c.case))
        return task_summary(self.cases, self.registry)["mean_dice"]


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def task_summary(cases: Sequence[CaseScore], registry: TaskRegistry, field: str = "dice") -> dict[str, Any]:
    """{"mean_<field>": mean over tasks, "tasks": {name: {field: mean over classes, "per_class": {label: v}}}}."""
    tasks: dict[str, Any] = {}
    for name in sorted({c.task for c in cases}, key=lambda n: registry[n].id):
        labels = registry[name].labels[1:]
        rows = [getattr(c, field) for c in cases if c.task == name]
        per_class = {label: _nanmean([r[k] for r in rows if r]) for k, label in enumerate(labels)}
        tasks[name] = {field: _nanmean(list(per_class.values())), "per_class": per_class}
    return {f"mean_{field}": _nanmean([t[field] for t in tasks.values()]), "tasks": tasks}


def group_counts(cases: Sequence[CaseScore], registry: TaskRegistry) -> dict[str, dict[str, dict[str, int]]]:
    """{task: {label: {group: number of cases}}} over :data:`GROUPS`."""
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for c in sorted(cases, key=lambda c: registry[c.task].id):
        labels = registry[c.task].labels[1:]
        per_class = counts.setdefault(c.task, {label: dict.fromkeys(GROUPS, 0) for label in labels})
        for label, group in zip(labels, c.groups):
            per_class[label][group] += 1
    return counts


def _json_safe(value: Any) -> Any:
    """NaN (no foreground in any reference) -> null, recursively."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def _fmt(value: float, scale: float = 1.0) -> str:
    return "n/a" if math.isnan(value) else f"{value * scale:.2f}"


def _tables(header: list[str], rows: list[list[str]]) -> tuple[str, str]:
    """(CSV, Markdown) of one table."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *rows])
    markdown = "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    )
    return buffer.getvalue(), markdown + "\n"


def _fields(hd95: bool, nsd: bool = False) -> list[tuple[str, str, float]]:
    return (
        [("Dice (%)", "dice", 100.0)]
        + ([("HD95 (mm)", "hd95", 1.0)] if hd95 else [])
        + ([("NSD (%)", "nsd", 100.0)] if nsd else [])
    )


def summary_tables(
    cases: Sequence[CaseScore], registry: TaskRegistry, hd95: bool, nsd: bool = False
) -> tuple[str, str]:
    """The Table 2 layout (tasks as columns, then the mean over tasks), Dice and NSD in %, HD95 in mm: CSV,
    Markdown."""
    names = sorted({c.task for c in cases}, key=lambda n: registry[n].id)
    rows = []
    for title, field, scale in _fields(hd95, nsd):
        summary = task_summary(cases, registry, field)
        rows.append(
            [title, *(_fmt(summary["tasks"][n][field], scale) for n in names), _fmt(summary[f"mean_{field}"], scale)]
        )
    return _tables(["metric", *names, "mean"], rows)


def class_tables(cases: Sequence[CaseScore], registry: TaskRegistry, hd95: bool, nsd: bool = False) -> tuple[str, str]:
    """The Table 3 layout: per task, its classes as columns (``short_labels``: Sp, RKi, ...), then the mean over
    classes; Dice and NSD in %, HD95 in mm; then the number of cases per group (:data:`GROUPS`). CSV (one row per
    task and metric) and Markdown (one table per task)."""
    counts = group_counts(cases, registry)
    csv_rows, markdown = [], []
    for name in sorted({c.task for c in cases}, key=lambda n: registry[n].id):
        task = registry[name]
        header = ["metric", *task.column_names[1:], "Mean"]
        rows = []
        for title, field, scale in _fields(hd95, nsd):
            summary = task_summary([c for c in cases if c.task == name], registry, field)["tasks"][name]
            rows.append([title, *(_fmt(v, scale) for v in summary["per_class"].values()), _fmt(summary[field], scale)])
        for group in GROUPS:
            rows.append([f"cases: {group}", *(str(counts[name][label][group]) for label in task.labels[1:]), ""])
        csv_rows += [[name, *header]] + [[name, *r] for r in rows]
        markdown.append(f"**{name}**\n\n" + _tables(header, rows)[1])
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(csv_rows)
    return buffer.getvalue(), "\n".join(markdown)


def per_case_csv(cases: Sequence[CaseScore], registry: TaskRegistry) -> str:
    """One row per case and foreground class: case, task, class, group, Dice, HD95 (mm), NSD; empty where not
    computed or excluded (``neither``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "task", "class", "dice", "hd95_mm", "nsd", "group"])

    def cell(values: list[float], k: int, digits: int) -> str:
        return "" if not values or math.isnan(values[k]) else f"{values[k]:.{digits}f}"

    for c in cases:
        for k, label in enumerate(registry[c.task].labels[1:]):
            writer.writerow([c.case, c.task, label, cell(c.dice, k, 4), cell(c.hd95, k, 2), cell(c.nsd, k, 4),
                             c.groups[k] if c.groups else ""])  # fmt: skip
    return buffer.getvalue()


class EvaluationReport:
    """Writes ``<output_dir>/`` per_case.csv, summary.csv/.md (Table 2 layout), per_class.csv/.md (Table 3
    layout) and summary.json when the evaluator completes, from a :class:`TaskDice` attached to the same
    evaluator (rank 0 only).

    summary.json = {"mean_dice": float, "tasks": {name: {"dice": float, "per_class": {label: dice}}}, "cases":
    {name: {label: {group: n}}}} with Dice in [0, 1] and the mean over tasks (null where every case of a class is
    ``neither``); with HD95 also "mean_hd95" and "hd95" = {name: {"hd95": mm, "per_class": {...}}}, with NSD
    "mean_nsd" and "nsd" likewise.
    """

    def __init__(self, metric: TaskDice, output_dir: str | Path, log: Callable[[str], Any] | None = print) -> None:
        self.metric = metric
        self.output_dir = Path(output_dir)
        self.log = log

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        cases, registry = self.metric.cases, self.metric.registry
        summary = task_summary(cases, registry)
        summary["cases"] = group_counts(cases, registry)
        for field, on in (("hd95", self.metric.hd95), ("nsd", self.metric.nsd)):
            if on:
                values = task_summary(cases, registry, field)
                summary[f"mean_{field}"], summary[field] = values[f"mean_{field}"], values["tasks"]
        table_csv, table_md = summary_tables(cases, registry, self.metric.hd95, self.metric.nsd)
        classes_csv, classes_md = class_tables(cases, registry, self.metric.hd95, self.metric.nsd)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "per_case.csv").write_text(per_case_csv(cases, registry))
        (self.output_dir / "summary.csv").write_text(table_csv)
        (self.output_dir / "summary.md").write_text(table_md)
        (self.output_dir / "per_class.csv").write_text(classes_csv)
        (self.output_dir / "per_class.md").write_text(classes_md)
        (self.output_dir / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2) + "\n")
        if self.log:
            self.log(f"{len(cases)} cases evaluated; summary in {self.output_dir / 'summary.json'}\n{table_md}")
