"""``uniseg ablate``: the paper's ablations and universal baselines trained side by side on the phantoms, over
several seeds in parallel processes, with the experiment that shows the prompt matters (``ph_organs`` and
``ph_liver`` share CT volumes; label 2 is the spleen in one and the liver tumour in the other, so a network that is
not told the task cannot be right on both) and its learning curves (wrong-task rates and tumour Dice against
iterations, from checkpoints kept during each run)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser

from uniseg_monai.apps.bundles import DEFAULT_BUNDLE, find_bundle, run_workflow
from uniseg_monai.apps.report import _pyplot, _save
from uniseg_monai.apps.runs import cell, failed_runs, run_all, seed_list, stats, study_folder, whole_numbers
from uniseg_monai.core.atomic import write_text_atomic
from uniseg_monai.core.errors import UsageError
from uniseg_monai.core.run_folder import latest_checkpoint
from uniseg_monai.data.phantoms import generate_phantoms
from uniseg_monai.engine.checkpoints import prune_checkpoints
from uniseg_monai.model_io.model_files import network_from_file

VARIANTS = ("uniseg", "fixed_prompt", "multiple_prompts", "uniseg_t", "dodnet", "task_blind")  # the default table
FLOOR = "task_blind"  # the network that is not told the task: the table's floor
SHARED = ("ph_organs", "ph_liver")  # the two tasks on the same CT volumes; label 2 differs
RECIPE = "demo"  # the overlay of train.json whose network, optimiser and budget (epochs x iterations) every run uses
CURVE_POINTS = 8  # learning-curve points per run by default: a checkpoint kept every epochs // CURVE_POINTS epochs
SHARED_TESTING = "shared_testing.json"  # the shared test volumes only, beside the datalist (:func:`shared_datalist`)
RATES = ("tumour_as_spleen", "spleen_as_tumour")  # :func:`wrong_task_rates`
COLUMNS = {  # table column -> (row metric, scale, decimals)
    "mean": ("mean_dice", 100, 1),
    "spleen (ph_organs 2)": ("spleen_dice", 100, 1),
    "tumour (ph_liver 2)": ("tumour_dice", 100, 1),
    "prompt effect (voxels)": ("prompt_effect_voxels", 1, 0),
    "tumour as spleen (%)": ("tumour_as_spleen", 100, 1),
    "spleen as tumour (%)": ("spleen_as_tumour", 100, 1),
    "train (s)": ("train_seconds", 1, 0),
}


def variant_configs(bundle: Path) -> list[str]:
    """The variant overlays of ``bundle`` (``configs/variants/<name>.json``) and ``uniseg`` (the paper's network)."""
    return ["uniseg", *sorted(p.stem for p in (bundle / "configs" / "variants").glob("*.json"))]


def recipe(bundle: Path) -> dict:
    """The settings every run shares, from ``train.json`` + the :data:`RECIPE` overlay: ``epochs``,
    ``iterations_per_epoch`` (the default budget) and what the table's footer names."""
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / f"{name}.json") for name in ("train", RECIPE)])
    ids = ("epochs", "iterations_per_epoch", "learning_rate", "constant_lr_fraction", "weight_decay",
           "prompt_weight_decay", "poly_power", "batch_size", "patch_size", "features")  # fmt: skip
    found = {key: parser.get_parsed_content(key) for key in ids if key in parser}
    found["optimizer"] = str(parser.get("optimizer#_target_")).rsplit(".", 1)[-1]
    found["augmentation"] = len(parser.get("augmentation_transforms") or [])
    return found


def shared_volumes(datalist: Path) -> list[dict[str, Path]]:
    """The test volumes segmented as both :data:`SHARED` tasks: per volume its image path and each task's label
    file (absolute paths)."""
    root = datalist.parent
    labels: dict[str, dict[str, Path]] = {}
    for item in json.loads(datalist.read_text())["testing"]:
        if item["task"] in SHARED and isinstance(item["image"], str):
            labels.setdefault(item["image"], {})[item["task"]] = root / item["label"]
    return [{"image": root / image, **tasks} for image, tasks in sorted(labels.items()) if len(tasks) == len(SHARED)]


def shared_datalist(datalist: Path) -> Path:
    """Write :data:`SHARED_TESTING` beside ``datalist``: its tasks and, as test cases, only the :data:`SHARED` tasks
    of the :func:`shared_volumes` (what the learning curves score); returns its path."""
    data = json.loads(datalist.read_text())
    images = {str(v["image"].relative_to(datalist.parent)) for v in shared_volumes(datalist)}
    testing = [item for item in data["testing"] if item["task"] in SHARED and item["image"] in images]
    path = datalist.parent / SHARED_TESTING
    write_text_atomic(path, json.dumps({"tasks": data["tasks"], "testing": testing}, indent=1) + "\n")
    return path


def _maps(predictions: Path, image: Path) -> list[np.ndarray]:
    """The saved :data:`SHARED` task maps of ``image`` (input grid), in :data:`SHARED` order."""
    stem = image.name.removesuffix(".nii.gz")
    return [np.asarray(nib.load(predictions / f"{stem}_{task}_seg.nii.gz").dataobj) for task in SHARED]


def prompt_effect(predictions: Path, datalist: Path) -> int:
    """Voxels that differ between the ``ph_organs`` and ``ph_liver`` maps of the shared test volumes."""
    return sum(int((a != b).sum()) for a, b in (_maps(predictions, v["image"]) for v in shared_volumes(datalist)))


def label_2_rates(predictions: Path, datalist: Path) -> dict[str, dict[str, float]]:
    """On the shared test volumes, where label 2 is the spleen under ``ph_organs`` and the liver tumour under
    ``ph_liver``: the fraction of the spleen voxels and of the tumour voxels labelled 2 under each :data:`SHARED`
    task, ``{"spleen": {"ph_organs": ..., "ph_liver": ...}, "tumour": {...}}``. A network that ignores its task id
    has equal rates under both tasks."""
    hits, totals = np.zeros((2, 2)), np.zeros(2)  # (structure, task), (structure,)
    for volume in shared_volumes(datalist):
        maps = _maps(predictions, volume["image"])
        for s, task in enumerate(SHARED):
            structure = np.asarray(nib.load(volume[task]).dataobj) == 2
            hits[s] += [(m[structure] == 2).sum() for m in maps]
            totals[s] += structure.sum()
    rates = hits / np.maximum(totals, 1)[:, None]
    return {name: dict(zip(SHARED, map(float, row))) for name, row in zip(("spleen", "tumour"), rates)}


def wrong_task_rates(predictions: Path, datalist: Path) -> dict[str, float]:
    """How often the network answers the other task on the shared test volumes (:func:`label_2_rates`):
    ``tumour_as_spleen`` = fraction of the tumour voxels labelled 2 under ``ph_organs``, ``spleen_as_tumour`` =
    fraction of the spleen voxels labelled 2 under ``ph_liver``. 0 for a network that follows its prompt, ~1 for one
    that answers one task whatever it is asked."""
    rates = label_2_rates(predictions, datalist)
    return {"tumour_as_spleen": rates["tumour"][SHARED[0]], "spleen_as_tumour": rates["spleen"][SHARED[1]]}


def _parameters(run: Path) -> int:
    """Learned parameters of the run's network (buffers such as a fixed prompt or an embedding table excluded)."""
    network, _ = network_from_file(run / "models" / "model.pt")
    return sum(p.numel() for p in network.parameters())


def _label_2(summary: dict, task: str) -> float:
    """The Dice of a task's label 2 (its second foreground class) in an evaluation's ``summary.json``."""
    per_class = summary["tasks"][task]["per_class"]
    return per_class[list(per_class)[1]]


def _curve(
    bundle: Path, configs: list[str], ids: dict, run: Path, datalist: Path, every: int, epochs: int, final: dict
) -> dict:
    """Tumour Dice and :func:`wrong_task_rates` of each checkpoint kept before the last epoch (every ``every``
    epochs) on the shared test volumes, scored by the bundle's evaluation (its sliding-window inferer), then
    ``final`` (the same metrics of the final model, from the run's own evaluation); per point the epoch it was saved
    at."""
    points = [(epoch, run / "models" / f"checkpoint_epoch={epoch}.pt") for epoch in range(every, epochs, every)]
    shared = datalist.parent / SHARED_TESTING
    curve: dict[str, list] = {"epoch": [], "tumour_dice": [], **{rate: [] for rate in RATES}}
    for epoch, checkpoint in points:
        scored = run / "curve" / f"epoch_{epoch}"
        run_workflow(bundle, "eval", [*configs, "evaluate"], **ids, datalist=str(shared), output_dir=str(scored),
                     evaluate_section="testing", save_predictions=True, write_report=False, overwrite=True,
                     **{"validate#handlers#0#load_path": str(checkpoint), "validate#task_dice#hd95": False,
                        "validate#task_dice#nsd": False})  # fmt: skip
        curve["epoch"].append(epoch)
        curve["tumour_dice"].append(_label_2(json.loads((scored / "summary.json").read_text()), SHARED[1]))
        for rate, value in wrong_task_rates(scored / "predictions", datalist).items():
            curve[rate].append(value)
    curve["epoch"].append(epochs)
    for key in ("tumour_dice", *RATES):
        curve[key].append(final[key])
    return curve


def run_variant(
    bundle: Path, name: str, seed: int, datalist: Path, run: Path, epochs: int, iterations: int, curve_every: int,
    extra: dict,
) -> dict:  # fmt: skip
    """Train (or resume) and evaluate one variant (``uniseg`` = the paper's network) with one seed in the run folder
    ``run``, keeping a checkpoint every ``curve_every`` epochs for its learning curve; its result (also written to
    ``run/result.json``)."""
    configs = ["train", RECIPE] + ([] if name == "uniseg" else [f"variants/{name}"])
    ids = {"dataset_dir": str(datalist.parent), "ckpt_dir": str(run / "models"), "seed": seed, **extra}
    timing = run / "train_seconds.json"
    if not (run / "models" / "model.pt").exists():  # an interrupted run continues exactly where it stopped
        tic = time.perf_counter()
        budget = {"epochs": epochs, "iterations_per_epoch": iterations, "val_interval": epochs}
        kept = {"keep_checkpoints": epochs // curve_every + 1, "train#checkpoint_saver#save_interval": curve_every}
        resume = latest_checkpoint(run / "models") is not None
        run_workflow(bundle, "train", configs, **ids, **budget, **kept, resume=resume, output_dir=str(run / "logs"))
        timing.write_text(json.dumps(time.perf_counter() - tic))
    seconds = json.loads(timing.read_text()) if timing.exists() else float("nan")
    run_workflow(bundle, "eval", [*configs, "evaluate"], **ids, output_dir=str(run), evaluate_section="testing",
              save_predictions=True, write_report=False, overwrite=True)  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    final = {"tumour_dice": _label_2(summary, SHARED[1]), **wrong_task_rates(run / "predictions", datalist)}
    tic = time.perf_counter()
    curve = _curve(bundle, configs, ids, run, datalist, curve_every, epochs, final)
    result = {
        "variant": name,
        "seed": seed,
        "budget": {"epochs": epochs, "iterations_per_epoch": iterations, "curve_every": curve_every},
        "parameters": _parameters(run),
        "dice": {t: v["dice"] for t, v in summary["tasks"].items()},
        "mean_dice": summary["mean_dice"],
        "spleen_dice": _label_2(summary, SHARED[0]),
        "prompt_effect_voxels": prompt_effect(run / "predictions", datalist),
        **final,
        "train_seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "curve": {"iterations": [e * iterations for e in curve.pop("epoch")], **curve},
        "curve_seconds": round(time.perf_counter() - tic, 1),
    }
    write_text_atomic(run / "result.json", json.dumps(result, indent=1) + "\n")
    prune_checkpoints(run / "models", 1)  # the curve is scored: the newest checkpoint stays, as in any run
    return result


def summarise(results: Sequence[dict]) -> list[dict]:
    """Per variant (in order of first appearance) its seeds, parameters and :func:`_stats` over seeds of each
    per-task Dice, the :data:`COLUMNS` metrics and the learning curve (per point)."""
    variants = list(dict.fromkeys(r["variant"] for r in results))
    rows = []
    for name in variants:
        runs = [r for r in results if r["variant"] == name]
        points = min(len(r["curve"]["iterations"]) for r in runs)
        rows.append({
            "variant": name,
            "seeds": [r["seed"] for r in runs],
            "parameters": runs[0]["parameters"],
            "dice": {t: stats([r["dice"][t] for r in runs]) for t in runs[0]["dice"]},
            **{key: stats([r[key] for r in runs]) for key, _, _ in COLUMNS.values()},
            "curve": {
                "iterations": runs[0]["curve"]["iterations"][:points],
                **{key: [stats([r["curve"][key][i] for r in runs]) for i in range(points)]
                   for key in ("tumour_dice", *RATES)},
            },
        })  # fmt: skip
    return rows


def table(rows: Sequence[dict], settings: dict, seeds: Sequence[int], threads: Sequence[int]) -> str:
    """The rows of :func:`summarise` as Markdown (Dice and wrong-task rates in %), the :data:`FLOOR` row labelled,
    with a footer stating the budget, seeds, settings (:func:`recipe` with ``curve_every``) and the torch threads of
    the runs."""
    tasks = list(rows[0]["dice"])
    head = ["variant", "parameters", *tasks, *COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name = f"{r['variant']} (floor: not told the task)" if r["variant"] == FLOOR else r["variant"]
        cells = [name, f"{r['parameters']:,}", *(cell(r["dice"][t], 100, 1) for t in tasks),
                 *(cell(r[key], scale, decimals) for key, scale, decimals in COLUMNS.values())]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    s = settings
    epochs, iterations = s["epochs"], s["iterations_per_epoch"]
    budget = f"{epochs * iterations:,} iterations ({epochs} epochs x {iterations})"
    prompt = f" (prompt_weight_decay {s['prompt_weight_decay']})" if "prompt_weight_decay" in s else ""
    sd = "mean ± sd (sample sd)" if len(seeds) > 1 else "one seed"
    patch = "x".join(str(p) for p in s["patch_size"])
    augmentation = f"{s['augmentation']} augmentation transforms" if s["augmentation"] else "crop-only augmentation"
    footer = (
        f"Dice and wrong-task rates in %, {sd} over seeds {', '.join(map(str, seeds))}; test cases of the phantom "
        f"tasks; wrong-task rates and prompt effect on the shared test volumes (ph_organs / ph_liver). Every run: "
        f"{budget}, batch {s['batch_size']}, configs train.json + {RECIPE}.json: {s['optimizer']} lr "
        f"{s['learning_rate']}, weight decay {s['weight_decay']}{prompt}, poly power {s['poly_power']}, patch {patch}, "
        f"features {s['features']}, {augmentation}; {' or '.join(map(str, threads))} torch thread(s) per run. Learning "
        f"curves (curves.png): a checkpoint every {s['curve_every']} epochs."
    )
    return "\n".join([*lines, "", footer])


def curves_figure(rows: Sequence[dict], path: Path) -> None:
    """``path`` (PNG): the wrong-task rates and tumour Dice of :func:`summarise`'s curves against iterations, one
    line per variant (the mean over seeds) with a band of ± 1 sd; the :data:`FLOOR` dashed."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    titles = {"tumour_as_spleen": "tumour as spleen: tumour voxels labelled 2 under ph_organs",
              "spleen_as_tumour": "spleen as tumour: spleen voxels labelled 2 under ph_liver",
              "tumour_dice": "tumour Dice (ph_liver label 2)"}  # fmt: skip
    for ax, (key, title) in zip(axes, titles.items(), strict=True):
        for r in rows:
            x = r["curve"]["iterations"]
            mean = np.array([p["mean"] for p in r["curve"][key]])
            sd = np.array([p["sd"] or 0.0 for p in r["curve"][key]])
            line = ax.plot(x, mean, marker="o", ms=3, ls="--" if r["variant"] == FLOOR else "-", label=r["variant"])
            ax.fill_between(x, mean - sd, mean + sd, color=line[0].get_color(), alpha=0.15, lw=0)
        ax.set(title=title, xlabel="iteration", ylabel="wrong-task rate" if key in RATES else "Dice", ylim=(0, 1))
    axes[-1].legend(fontsize=8)
    figure.tight_layout()
    _save(figure, path)


def _write(out: Path, results: list[dict], failed: dict, settings: dict, seeds: list[int]) -> None:
    """``OUT/ablation.md`` / ``.json`` and ``OUT/curves.png`` of the finished runs; the table is printed."""
    rows = summarise(results)
    text = table(rows, settings, seeds, sorted({r["threads"] for r in results}))
    if failed:
        text += "\n\nFailed (not in the table): " + ", ".join(f"{v} seed {k}" for v, k in failed) + "."
    errors = [{"variant": v, "seed": k, "error": e} for (v, k), e in failed.items()]
    report = {"settings": settings, "seeds": seeds, "variants": rows, "runs": results, "failed": errors}
    write_text_atomic(out / "ablation.json", json.dumps(report, indent=1) + "\n")
    write_text_atomic(out / "ablation.md", text + "\n")
    curves_figure(rows, out / "curves.png")
    print(text)


def ablate(
    out: str | Path,
    variants: Sequence[str] = VARIANTS,
    epochs: int | None = None,
    iterations: int | None = None,
    bundle: str | Path = DEFAULT_BUNDLE,
    seeds: int | str | Sequence[int] = 3,
    jobs: int | None = None,
    curve_every: int | None = None,
    **ids: object,
) -> Path:
    """Train each variant with each seed at the same budget on the phantoms (generated into ``OUT/data`` once), one
    run folder ``OUT/<variant>/seed_<k>`` per run, ``jobs`` runs at a time in spawned processes (default: one per
    core, up to the runs to do), and write ``OUT/ablation.md`` / ``.json`` (mean ± sd over seeds) and
    ``OUT/curves.png``. Budget: ``epochs`` x ``iterations`` per epoch, default :data:`RECIPE`'s; learning-curve
    checkpoints every ``curve_every`` epochs (default epochs // :data:`CURVE_POINTS`). Finished runs are reused, an
    interrupted one resumes exactly from its last kept checkpoint; a failed run is reported in one line with its
    variant and seed, the others finish and are tabled, then :class:`UniSegError` names the failed ones.
    ``bundle``: a folder or name (:func:`~uniseg_monai.apps.bundles.find_bundle`). Returns the Markdown file."""
    bundle, out = find_bundle(bundle).resolve(), Path(out).resolve()
    known = variant_configs(bundle)
    unknown = [v for v in variants if v not in known]
    if unknown:
        raise UsageError(f"unknown variant(s) {unknown}; choose from {known}")
    whole_numbers(epochs=epochs, iterations=iterations, jobs=jobs, curve_every=curve_every)
    settings = recipe(bundle)
    epochs = settings["epochs"] = int(epochs or settings["epochs"])
    iterations = settings["iterations_per_epoch"] = int(iterations or settings["iterations_per_epoch"])
    if epochs < 1 or iterations < 1:
        raise UsageError(f"--epochs and --iterations must be >= 1, got {epochs} and {iterations}")
    curve_every = settings["curve_every"] = int(curve_every or max(1, epochs // CURVE_POINTS))
    if not 1 <= curve_every <= epochs:
        raise UsageError(f"--curve_every must be between 1 and --epochs ({epochs}) epochs, got {curve_every}")
    if jobs is not None and int(jobs) < 1:
        raise UsageError(f"--jobs must be >= 1, got {jobs}")
    seeds = seed_list(seeds)
    with study_folder(out, "ablation"):  # one command per --out: a second is refused before any run starts
        budget = {"epochs": epochs, "iterations_per_epoch": iterations, "curve_every": curve_every}
        runs = {(v, k): out / v / f"seed_{k}" for v in dict.fromkeys(variants) for k in seeds}
        results = {key: json.loads((run / "result.json").read_text()) for key, run in runs.items()
                   if (run / "result.json").exists()}  # fmt: skip
        stale = [f"{runs[key]} ({r['budget']})" for key, r in results.items() if r["budget"] != budget]
        if stale:
            raise UsageError(f"{stale[0]} was run with another budget than {budget}: choose another --out or delete it")
        datalist = out / "data" / "datalist.json"
        if not datalist.exists():
            generate_phantoms(datalist.parent)
        shared_datalist(datalist)
        common = {"bundle": bundle, "datalist": datalist, "epochs": epochs, "iterations": iterations,
                  "curve_every": curve_every, "extra": dict(ids)}  # fmt: skip
        todo = {
            key: {"name": key[0], "seed": key[1], "run": run, **common}
            for key, run in runs.items()
            if key not in results
        }
        failed, logs = {}, f"{out}/<variant>/seed_<k>/console.log"
        if todo:
            done, failed = run_all(run_variant, todo, jobs, "uniseg ablate", logs)
            results.update(done)
        if results:
            _write(out, [results[key] for key in runs if key in results], failed, settings, seeds)
        if failed:
            raise failed_runs(failed, logs, len(runs))
        return out / "ablation.md"
