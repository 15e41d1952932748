"""``uniseg report RUN_DIR``: one ``report.html`` with PNGs of a training / evaluation run (what nnU-Net's
``progress.png``, TensorBoard and the paper's Fig. 4 show).

From what the run folder holds (each part is left out with a note when its inputs are missing):

- ``curves.png``: training loss per iteration, learning rate and validation Dice (mean and per task) per epoch,
  from the TensorBoard event files anywhere under the folder;
- ``dice.png``: per-task Dice (and NSD) over the cases as box and strip plots from ``per_case.csv``, with the
  paper's numbers where the facts file gives them ("paper" vs "this run");
- ``overlay_<task>.png``: the best, median and worst case of each task, three orthogonal slices through the
  reference's centre, image with the reference (green) and prediction (red) contours (needs ``predictions/`` and
  the datalist);
- ``prompt.png``: one volume segmented under two tasks side by side (a multi-task model's prompt at work).
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from ignite.engine import Engine, Events

from uniseg_monai.core.atomic import inside, write_atomic, write_text_atomic
from uniseg_monai.core.errors import UsageError, flag
from uniseg_monai.core.json_files import read_json
from uniseg_monai.core.progress import progress_bar
from uniseg_monai.data.transforms import MapTaskLabelsd, image_stem
from uniseg_monai.tasks import PAPER_DICE, PAPER_UPSTREAM_MEAN_DICE, PAPER_UPSTREAM_TASKS, Task, TaskRegistry

REPORT = "report.html"
FIGURE_DPI = 80
CURVES_SIZE = (15, 4)  # inches


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> None:
    """A matplotlib figure as PNG, written atomically; the figure is closed."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=FIGURE_DPI)
    _pyplot().close(figure)
    write_atomic(path, lambda f: f.write(buffer.getvalue()))


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of every TensorBoard event file under ``run_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(run_dir.rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return {tag: sorted(values) for tag, values in scalars.items()}


def read_cases(path: Path) -> list[dict[str, Any]]:
    """``per_case.csv`` rows with numbers as floats (NaN where empty)."""
    try:
        with path.open() as f:
            reader = csv.DictReader(f)
            rows = list(reader)
        missing = [key for key in ("task", "case", "dice") if key not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"no column(s) {', '.join(missing)}")
        for row in rows:
            for key in ("dice", "hd95_mm", "nsd"):
                row[key] = float(row[key]) if row.get(key) else float("nan")
            row["task"], row["case"] = str(row["task"]), str(row["case"])
    except (ValueError, KeyError, TypeError, csv.Error, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: not an evaluation table ({err}); re-run the evaluation into this folder") from None
    return rows


def case_means(rows: Sequence[Mapping[str, Any]], field: str = "dice") -> dict[tuple[str, str], float]:
    """{(task, case): mean over the case's scored classes} (cases with no scored class left out)."""
    values: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        values.setdefault((row["task"], row["case"]), []).append(row[field])
    means = {key: float(np.nanmean(v)) for key, v in values.items() if not all(math.isnan(x) for x in v)}
    return means


def curves_figure(scalars: Mapping[str, list[tuple[int, float]]], path: Path) -> None:
    plt = _pyplot()
    figure, (loss, rate, dice) = plt.subplots(1, 3, figsize=CURVES_SIZE)
    for ax, tag, x in ((loss, "train_loss", "iteration"), (rate, "lr", "epoch")):
        if tag in scalars:
            steps, values = zip(*scalars[tag])
            ax.plot(steps, values, lw=0.8, color="tab:blue")
        else:
            ax.text(0.5, 0.5, f"{tag} not logged", ha="center", transform=ax.transAxes)
        ax.set(xlabel=x)
    loss.set(title="training loss (Dice + CE, deep supervision)", ylabel="loss")
    rate.set(title="learning rate (end of epoch)", ylabel="lr")
    # epoch-level values are logged per epoch, the loss per iteration: both logged, epochs become iterations
    per_epoch = scalars["train_loss"][-1][0] / scalars["lr"][-1][0] if {"train_loss", "lr"} <= set(scalars) else 1
    for tag, values in scalars.items():
        if tag.startswith("val_mean_dice"):
            steps, dices = zip(*values)
            name = tag.partition("/")[2] or "mean over tasks"
            x = [per_epoch * step for step in steps]
            dice.plot(x, dices, marker="o", ms=3, lw=2 if "/" not in tag else 1, label=name)
    dice.set(title="validation Dice", xlabel="iteration" if per_epoch != 1 else "epoch", ylabel="Dice", ylim=(0, 1))
    if dice.lines:
        dice.legend(fontsize=8)
    figure.tight_layout()
    _save(figure, path)


def scores_figure(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str], path: Path) -> None:
    plt = _pyplot()
    fields = [f for f in ("dice", "nsd") if any(not math.isnan(r[f]) for r in rows)]
    figure, axes = plt.subplots(1, len(fields), figsize=(max(5, 1.4 * len(tasks)) * len(fields), 4), squeeze=False)
    for ax, field in zip(axes[0], fields):
        means = case_means(rows, field)
        data = [[100 * v for (t, _), v in means.items() if t == task] for task in tasks]
        ax.boxplot([d or [float("nan")] for d in data], showfliers=False)
        for k, values in enumerate(data, start=1):
            ax.scatter(np.full(len(values), k) + np.linspace(-0.12, 0.12, len(values)), values, s=12, color="tab:blue",
                       label="this run" if k == 1 else None)  # fmt: skip
        paper = [(k, PAPER_DICE[t]) for k, t in enumerate(tasks, start=1) if t in PAPER_DICE]
        if field == "dice" and paper:
            ax.scatter(*zip(*paper), marker="D", color="tab:red", s=40, label="paper (Table 3)")
        if field == "dice" and any(t in PAPER_UPSTREAM_TASKS for t in tasks):
            ax.axhline(PAPER_UPSTREAM_MEAN_DICE, ls="--", color="tab:red", lw=1, label="paper: mean of its 11 tasks")
        ax.set_xticks(range(1, len(tasks) + 1), tasks, rotation=20)
        ax.set(title=f"{field.upper() if field == 'nsd' else 'Dice'} per case (mean over classes)", ylabel="%",
               ylim=(-2, 102))  # fmt: skip
        ax.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    _save(figure, path)


def _load(path: str | Sequence[str]) -> np.ndarray:
    """The first channel of an image (X, Y, Z)."""
    data = np.asanyarray(nib.load(path if isinstance(path, str) else path[0]).dataobj, dtype=np.float32)
    return data[..., 0] if data.ndim == 4 else data


def _slices(volume: np.ndarray, center: Sequence[int]) -> list[np.ndarray]:
    """Three orthogonal slices through ``center``, each transposed for display (rows = second axis)."""
    i, j, k = center
    return [volume[:, :, k].T, volume[:, j, :].T, volume[i, :, :].T]


def overlay_figure(cases: Sequence[tuple[str, str, float, dict[str, Any]]], task: Task, path: Path) -> None:
    """Rows: (title, image, Dice, {"image", "label", "pred"} arrays); columns: axial, coronal, sagittal."""
    plt = _pyplot()
    figure, axes = plt.subplots(len(cases), 3, figsize=(9, 3 * len(cases)), squeeze=False)
    for row, (title, case, dice, arrays) in enumerate(cases):
        foreground = np.argwhere(arrays["label"] > 0)
        center = foreground.mean(0).round().astype(int) if len(foreground) else np.array(arrays["label"].shape) // 2
        views = zip(*(_slices(arrays[key], center) for key in ("image", "label", "pred")))
        for col, (image, label, pred) in enumerate(views):
            ax = axes[row, col]
            ax.imshow(image, cmap="gray", origin="lower")
            for mask, color in ((label, "lime"), (pred, "red")):
                if mask.max() > 0:
                    ax.contour(mask > 0, levels=[0.5], colors=color, linewidths=0.8, origin="lower")
            ax.set_axis_off()
            if col == 0:
                ax.set_title(f"{title}: {case} (Dice {100 * dice:.1f} %)", fontsize=9, loc="left")
    figure.suptitle(f"{task.name}: reference (green) and prediction (red)", fontsize=10)
    figure.tight_layout()
    _save(figure, path)


def prompt_figure(image: np.ndarray, maps: Mapping[str, np.ndarray], path: Path) -> None:
    """One volume under several tasks: the axial slice through the centre of all their foregrounds."""
    plt = _pyplot()
    union = np.argwhere(sum(m > 0 for m in maps.values()))
    k = int(union[:, 2].mean().round()) if len(union) else image.shape[2] // 2
    figure, axes = plt.subplots(1, len(maps), figsize=(4 * len(maps), 4), squeeze=False)
    for ax, (task, labels) in zip(axes[0], maps.items()):
        ax.imshow(image[:, :, k].T, cmap="gray", origin="lower")
        shown = np.ma.masked_equal(labels[:, :, k].T, 0)
        ax.imshow(shown, cmap="tab10", vmin=0, vmax=9, alpha=0.5, origin="lower", interpolation="nearest")
        ax.set_title(f"task {task}", fontsize=10)
        ax.set_axis_off()
    figure.suptitle("the same volume, the task prompt switched", fontsize=10)
    figure.tight_layout()
    _save(figure, path)


def _items(datalist: Path | None, registry: TaskRegistry | None) -> dict[tuple[str, str], dict[str, Any]]:
    """{(task, case): datalist item with absolute paths} of every section."""
    if datalist is None or registry is None:
        return {}
    from uniseg_monai.data.datalist import SECTIONS, load_items

    out = {}
    for section in SECTIONS:
        for item in load_items(datalist, section, registry):
            out[(item["task"], item.get("case") or image_stem(item["image"]))] = item
    return out


def _table(summary: Mapping[str, Any]) -> str:
    """The summary's per-task numbers as an HTML table (Dice, HD95, NSD as in summary.json: Dice/NSD in %)."""
    tasks = list(summary.get("tasks", {}))
    rows = [("Dice (%)", "tasks", "dice", 100.0), ("HD95 (mm)", "hd95", "hd95", 1.0), ("NSD (%)", "nsd", "nsd", 100.0)]
    body = []
    for title, section, key, scale in rows:
        if section not in summary:
            continue
        cells = [summary[section][t][key] for t in tasks] + [summary.get(f"mean_{key}")]
        body.append(f"<tr><th>{title}</th>" + "".join(
            f"<td>{'n/a' if v is None else f'{v * scale:.2f}'}</td>" for v in cells) + "</tr>")  # fmt: skip
    header = "".join(f"<th>{html.escape(t)}</th>" for t in [*tasks, "mean"])
    return f"<table><tr><th>metric</th>{header}</tr>{''.join(body)}</table>"


def write_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    datalist: str | Path | None = None,
    registry: TaskRegistry | None = None,
    progress: bool = True,
) -> Path:
    """Write ``report.html`` and its PNGs for ``run_dir`` into ``out`` (default ``run_dir``); returns the HTML.

    ``datalist`` (and ``registry``, default: the datalist's tasks) locate images and references for the overlays.
    """
    run = Path(run_dir)
    if run.exists() and not run.is_dir():
        raise UsageError(
            f"run folder {run} is a file, not a folder: give the output_dir of a training or evaluation run"
        )
    if not run.is_dir():
        raise UsageError(f"run folder {run} not found: give the output_dir of a training or evaluation run")
    out_dir = Path(out) if out else run
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} is a file: give a folder for report.html and its PNGs")
    if datalist and registry is None:
        from uniseg_monai.engine.wiring import registry_for_datalist

        registry = registry_for_datalist(datalist)
    notes, sections = [], []

    scalars = read_scalars(run)
    summary_path, cases_path = run / "summary.json", run / "per_case.csv"
    try:
        summary = read_json(summary_path) if summary_path.is_file() else {}
    except json.JSONDecodeError as err:
        raise UsageError(f"{summary_path}: not valid JSON ({err}); re-run the evaluation into this folder") from None
    rows = read_cases(cases_path) if cases_path.is_file() else []
    if not scalars and not summary and not rows:
        raise UsageError(
            f"run folder {run}: nothing to report (no TensorBoard event files, {summary_path.name} or "
            f"{cases_path.name}): give the output_dir of a training or evaluation run (nothing was written)"
        )
    steps = progress_bar(total=4, show=progress, desc="uniseg report", unit="part")
    if scalars:
        curves_figure(scalars, out_dir / "curves.png")
        sections.append(("Training", "curves.png"))
    else:
        notes.append("no training curves: no TensorBoard event files under this folder")
    steps.update()

    tasks = list(summary.get("tasks", {})) or list(dict.fromkeys(r["task"] for r in rows))
    if rows:
        scores_figure(rows, tasks, out_dir / "dice.png")
        sections.append(("Dice per case", "dice.png"))
    else:
        notes.append(f"no evaluation: {cases_path.name} not found (run the bundle's evaluate.json into this folder)")
    steps.update()

    items = _items(Path(datalist) if datalist else None, registry)
    predictions = run / "predictions"
    if not rows or not predictions.is_dir() or not items:
        notes.append("no overlays: they need per_case.csv, the saved predictions (predictions/) and --datalist")
    else:
        means = case_means(rows)
        map_labels = MapTaskLabelsd("label", registry)  # the task's label_map, as training applies it
        for task in tasks:
            ranked = sorted((d, c) for (t, c), d in means.items() if t == task and (t, c) in items)
            ranked = [(d, c) for d, c in ranked if (predictions / f"{c}_{task}_seg.nii.gz").is_file()]
            if not ranked:
                notes.append(f"no overlay for {task}: no saved prediction of its evaluated cases")
                continue
            chosen = {"best": ranked[-1], "median": ranked[len(ranked) // 2], "worst": ranked[0]}
            cases = []
            for title, (dice, case) in chosen.items():
                item = items[(task, case)]
                label = map_labels({"label": _load(item["label"]), "task": task})["label"]
                arrays = {"image": _load(item["image"]), "label": label,
                          "pred": _load(str(predictions / f"{case}_{task}_seg.nii.gz"))}  # fmt: skip
                cases.append((title, case, dice, arrays))
            overlay_figure(cases, registry[task], inside(out_dir, f"overlay_{task}.png"))
            sections.append((f"{task}: best, median, worst case", f"overlay_{task}.png"))
    steps.update()

    shared = {}
    for (task, case), item in items.items():
        if isinstance(item["image"], str) and (predictions / f"{case}_{task}_seg.nii.gz").is_file():
            shared.setdefault(item["image"], {})[task] = predictions / f"{case}_{task}_seg.nii.gz"
    pair = next(((image, maps) for image, maps in shared.items() if len(maps) > 1), None)
    if pair:
        image, maps = pair
        prompt_figure(_load(image), {t: _load(str(p)) for t, p in maps.items()}, out_dir / "prompt.png")
        sections.append((f"The prompt: {Path(image).name} under {', '.join(maps)}", "prompt.png"))
    steps.update()
    steps.close()

    figures = "".join(f'<h2>{html.escape(t)}</h2><img src="{png}" alt="{html.escape(t)}">' for t, png in sections)
    table = f"<h2>Summary</h2>{_table(summary)}" if summary else ""
    missing = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>UniSeg report: {html.escape(run.name)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;text-align:right}"
        "img{max-width:100%}</style></head><body>"
        f"<h1>UniSeg report: {html.escape(str(run.resolve()))}</h1>{table}{figures}"
        + (f"<h2>Not in this report</h2><ul>{missing}</ul>" if notes else "")
        + "</body></html>\n"
    )
    write_text_atomic(out_dir / REPORT, page)
    return out_dir / REPORT


class ReportWriter:
    """Write :func:`write_report` of ``output_dir`` when an evaluation completes (rank 0 only; ``enabled``: the
    bundle id ``write_report``)."""

    def __init__(self, output_dir: str | Path, datalist: str | Path, registry: TaskRegistry, enabled: bool = True):
        self.output_dir, self.datalist, self.registry = output_dir, datalist, registry
        self.enabled = flag(enabled, "write_report")

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        datalist = self.datalist if Path(self.datalist).is_file() else None
        path = write_report(self.output_dir, datalist=datalist, registry=self.registry, progress=False)
        engine.logger.info(f"report: {path}")
