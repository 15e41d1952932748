"""Per-task Dice / HD95: the validation key metric and the evaluation report (the paper's Table 2 layout)."""

from __future__ import annotations

import csv
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
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot

from uniseg_monai.tasks import TaskRegistry
from uniseg_monai.transforms import image_stem


@dataclass
class CaseScore:
    """One evaluated case: Dice (and HD95 in mm, if computed) per foreground class; NaN where the label is empty."""

    case: str
    task: str
    dice: list[float]
    hd95: list[float]


def case_name(item: dict[str, Any]) -> str:
    """The case name :class:`~uniseg_monai.transforms.RecordTaskd` recorded, else the image file stem."""
    meta = getattr(item["image"], "meta", {})
    return meta.get("case") or image_stem(meta.get("filename_or_obj", ""))


def score_case(pred: torch.Tensor, label: torch.Tensor, classes: int, hd95: bool) -> tuple[list[float], list[float]]:
    """pred, label (1, X, Y, Z) label maps of one task with ``classes`` classes -> Dice, HD95 per foreground class."""
    p = one_hot(pred[None].long(), classes)
    y = one_hot(label[None].long().to(pred.device), classes)
    dice = compute_dice(p, y, include_background=False, ignore_empty=True)[0].tolist()
    if not hd95:
        return dice, []
    spacing = torch.as_tensor(label.pixdim).tolist() if isinstance(label, MetaTensor) else None
    with warnings.catch_warnings():  # an empty class gives NaN (reported as n/a), not one warning per class
        warnings.simplefilter("ignore")
        dist_mm = compute_hausdorff_distance(p, y, include_background=False, percentile=95, spacing=spacing)[0]
    return dice, [float(v) if math.isfinite(v) else float("nan") for v in dist_mm.tolist()]


class TaskDice(Metric):
    """Mean Dice over tasks (each task: mean over its foreground classes of the per-class mean over cases).

    Attached to a MONAI evaluator with ``decollate=True``: for every item it reads the post-processed label maps
    ``pred`` (from ``engine.state.output``) and ``label_key`` (1, X, Y, Z) (output or batch) and the task from
    ``engine.state.batch``. Cases of all ranks are gathered. After ``compute()``, :attr:`cases` holds the
    :class:`CaseScore` list (used by :class:`EvaluationReport`).

    Args:
        registry: the tasks (names, ids, label names).
        hd95: also compute the 95th-percentile Hausdorff distance in mm (slower; for evaluation).
        label_key: output key of the reference label map.
    """

    def __init__(self, registry: TaskRegistry, hd95: bool = False, label_key: str = "label") -> None:
        self.registry = registry
        self.hd95 = hd95
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
            dice, hd = score_case(out["pred"], reference, task.num_classes, self.hd95)
            self._local.append(CaseScore(case_name(item), task.name, dice, hd))

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


def _fields(hd95: bool) -> list[tuple[str, str, float]]:
    return [("Dice (%)", "dice", 100.0)] + ([("HD95 (mm)", "hd95", 1.0)] if hd95 else [])


def summary_tables(cases: Sequence[CaseScore], registry: TaskRegistry, hd95: bool) -> tuple[str, str]:
    """The Table 2 layout (tasks as columns, then the mean over tasks), Dice in %, HD95 in mm: CSV, Markdown."""
    names = sorted({c.task for c in cases}, key=lambda n: registry[n].id)
    rows = []
    for title, field, scale in _fields(hd95):
        summary = task_summary(cases, registry, field)
        rows.append(
            [title, *(_fmt(summary["tasks"][n][field], scale) for n in names), _fmt(summary[f"mean_{field}"], scale)]
        )
    return _tables(["metric", *names, "mean"], rows)


def class_tables(cases: Sequence[CaseScore], registry: TaskRegistry, hd95: bool) -> tuple[str, str]:
    """The Table 3 layout: per task, its classes as columns (``short_labels``: Sp, RKi, ...), then the mean over
    classes; Dice in %, HD95 in mm. CSV (one row per task and metric) and Markdown (one table per task)."""
    csv_rows, markdown = [], []
    for name in sorted({c.task for c in cases}, key=lambda n: registry[n].id):
        task = registry[name]
        header = ["metric", *task.column_names[1:], "Mean"]
        rows = []
        for title, field, scale in _fields(hd95):
            summary = task_summary([c for c in cases if c.task == name], registry, field)["tasks"][name]
            rows.append([title, *(_fmt(v, scale) for v in summary["per_class"].values()), _fmt(summary[field], scale)])
        csv_rows += [[name, *header]] + [[name, *r] for r in rows]
        markdown.append(f"**{name}**\n\n" + _tables(header, rows)[1])
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(csv_rows)
    return buffer.getvalue(), "\n".join(markdown)


def per_case_csv(cases: Sequence[CaseScore], registry: TaskRegistry) -> str:
    """One row per case: case, task, then Dice (and HD95) of every foreground class of the task."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "task", "class", "dice", "hd95_mm"])
    for c in cases:
        for k, label in enumerate(registry[c.task].labels[1:]):
            hd = c.hd95[k] if c.hd95 else float("nan")
            writer.writerow([c.case, c.task, label, f"{c.dice[k]:.4f}", "" if math.isnan(hd) else f"{hd:.2f}"])
    return buffer.getvalue()


class EvaluationReport:
    """Writes ``<output_dir>/`` per_case.csv, summary.csv/.md (Table 2 layout), per_class.csv/.md (Table 3
    layout) and summary.json when the evaluator completes, from a :class:`TaskDice` attached to the same
    evaluator (rank 0 only).

    summary.json = {"mean_dice": float, "tasks": {name: {"dice": float, "per_class": {label: dice}}}} with Dice
    in [0, 1] and the mean over tasks (null where no reference holds the class); with HD95 also "mean_hd95" and
    "hd95" = {name: {"hd95": mm, "per_class": {...}}}.
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
        if self.metric.hd95:
            hd = task_summary(cases, registry, "hd95")
            summary["mean_hd95"], summary["hd95"] = hd["mean_hd95"], hd["tasks"]
        table_csv, table_md = summary_tables(cases, registry, self.metric.hd95)
        classes_csv, classes_md = class_tables(cases, registry, self.metric.hd95)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "per_case.csv").write_text(per_case_csv(cases, registry))
        (self.output_dir / "summary.csv").write_text(table_csv)
        (self.output_dir / "summary.md").write_text(table_md)
        (self.output_dir / "per_class.csv").write_text(classes_csv)
        (self.output_dir / "per_class.md").write_text(classes_md)
        (self.output_dir / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2) + "\n")
        if self.log:
            self.log(f"{len(cases)} cases evaluated; summary in {self.output_dir / 'summary.json'}\n{table_md}")
