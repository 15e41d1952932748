"""``uniseg transfer``: the paper's second claim on the phantoms. A task unseen in pretraining (``ph_kidneys``: both
kidneys and the gallbladder of BTCV-like phantoms, 4 classes) is fine-tuned with a fine-tuning bundle's
``configs/demo.json`` from scratch and from a pretrained UniSeg at the same budget, on several seeds in parallel
processes (:mod:`uniseg_monai.apps.runs`, as ``uniseg ablate``); per run the test Dice per class, the validation Dice
against iterations and the iterations it took to reach a validation-Dice threshold, as mean ± sd over seeds
(``transfer.md`` / ``.json``) and a figure (``curves.png``). ``make demo`` runs the same pair with one seed."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from uniseg_monai.apps.ablation import recipe
from uniseg_monai.apps.bundles import DEFAULT_BUNDLE, FINETUNE_BUNDLES, bundle_workflow, find_bundle, run_workflow
from uniseg_monai.apps.report import _pyplot, _save, read_scalars
from uniseg_monai.apps.runs import cell, failed_runs, run_all, seed_list, stats, study_folder, whole_numbers
from uniseg_monai.core.atomic import write_text_atomic
from uniseg_monai.core.errors import UsageError
from uniseg_monai.core.run_folder import latest_checkpoint
from uniseg_monai.data.phantoms import DOWNSTREAM_TASKS, generate_downstream_phantoms, generate_phantoms
from uniseg_monai.data.prepare import prepare
from uniseg_monai.model_io.transfer import load_pretrained

SCRATCH, FINE_TUNED = "from scratch", "fine-tuned"
RUNS = {SCRATCH: "from_scratch", FINE_TUNED: "fine_tuned"}  # run -> its folder
CONFIGS = ["train", "demo"]  # the fine-tuning bundle's configs every run trains with (the demo's recipe)
TASK = "ph_kidneys"
THRESHOLD = 0.8  # validation mean Dice whose first crossing is tabled (iterations to reach it)
VAL_TAG = "val_mean_dice"  # the TensorBoard scalar of the training's validation


def kidneys_datalist(out_dir: Path) -> Path:
    """``<out_dir>/data_btcv/datalist.json``: task ``ph_kidneys`` (right / left kidney, gallbladder of BTCV-like
    phantoms: structures and a class count the pretraining never saw), generated once."""
    datalist = out_dir / "data_btcv" / "datalist.json"
    if not datalist.exists():
        raw = generate_downstream_phantoms(datalist.parent / "raw", "btcv", cases=10, seed=1, spacing=[2.0, 2.0, 4.0])
        prepare(raw, TASK, datalist, fmt="btcv", val_fraction=0.125, test_fraction=0.2)
        data = json.loads(datalist.read_text())
        data["tasks"][TASK].update(DOWNSTREAM_TASKS[TASK])
        datalist.write_text(json.dumps(data, indent=1))
    return datalist


def pretrain(out_dir: Path, bundle: str | Path = DEFAULT_BUNDLE, name: str = "pretrain") -> Path:
    """The demo's pretraining: ``bundle`` (the pretrain bundle) trained with ``configs/demo.json`` on the phantoms
    (generated into ``<out_dir>/data`` once) into ``<out_dir>/<name>``; a finished one is reused. Returns the run
    folder (its model file: ``models/model.pt``)."""
    datalist = out_dir / "data" / "datalist.json"
    if not datalist.exists():
        generate_phantoms(datalist.parent)
    run = out_dir / name
    if (run / "models" / "model.pt").exists():
        print(f"reusing the trained model in {run / 'models'} (delete {run} to train again)")
    else:
        dirs = {"dataset_dir": str(datalist.parent), "ckpt_dir": str(run / "models")}
        run_workflow(find_bundle(bundle).resolve(), "train", ["train", "demo"], **dirs, output_dir=str(run / "logs"))
    return run


def finetune_ids(datalist: Path, run: Path, pretrained: str | Path, seed: int = 0) -> dict:
    """The bundle ids of one fine-tuning run in folder ``run`` (``pretrained`` '' = from scratch): what the demo and
    ``uniseg transfer`` pass to :data:`CONFIGS`."""
    return {"dataset_dir": str(datalist.parent), "ckpt_dir": str(run / "models"), "pretrained": str(pretrained),
            "seed": seed, "task": TASK}  # fmt: skip


def budget_of(bundle: Path, epochs: int | None = None, iterations: int | None = None) -> dict:
    """The budget of every run: ``epochs`` x ``iterations`` per epoch (default: :data:`CONFIGS`'), validation every
    ``val_interval`` epochs (the configs', at most ``epochs``)."""
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / f"{name}.json") for name in CONFIGS])
    epochs = int(epochs or parser.get_parsed_content("epochs"))
    iterations = int(iterations or parser.get_parsed_content("iterations_per_epoch"))
    val_interval = min(int(parser.get_parsed_content("val_interval")), epochs)
    return {"epochs": epochs, "iterations_per_epoch": iterations, "val_interval": val_interval}


def check_pretrained(bundle: Path, pretrained: str | Path) -> None:
    """Before any training: ``pretrained`` loaded as the fine-tuning runs load it (the bundle's
    ``pretrained_network``: :func:`~uniseg_monai.model_io.transfer.load_pretrained` into the :data:`CONFIGS`'
    network, heads aside), so a file that is no model, or a UniSeg whose encoder-decoder does not fit, is one line
    naming it (:class:`~uniseg_monai.model_io.transfer.PretrainedCheckpointError`) instead of a failed run."""
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / f"{name}.json") for name in CONFIGS])
    parser["num_classes"] = 2  # the heads are not transferred: any class count checks the rest
    load_pretrained(parser.get_parsed_content("network_def"), pretrained)


def validation_curve(logs: Path, iterations: int) -> dict[str, list]:
    """The validation mean Dice the training logged (TensorBoard, :data:`VAL_TAG`, per epoch; a resumed run's
    repeated epochs once, the latest) against iterations (epoch x ``iterations`` per epoch)."""
    points = sorted(dict(read_scalars(logs).get(VAL_TAG, [])).items())
    return {"iterations": [int(e) * iterations for e, _ in points], "val_dice": [float(d) for _, d in points]}


def first_reach(curve: dict[str, list], threshold: float) -> int | None:
    """The first iteration at which the validation Dice reached ``threshold``, or None."""
    return next((i for i, d in zip(curve["iterations"], curve["val_dice"], strict=True) if d >= threshold), None)


def train_workflow(
    bundle: Path, name: str, seed: int, datalist: Path, run: Path, budget: dict, pretrained: str | Path
) -> ConfigWorkflow:
    """The initialised training workflow of one fine-tuning run (:func:`run_finetune`'s arguments; ``pretrained``
    is used by :data:`FINE_TUNED` only), resuming from the run's last checkpoint when it has one."""
    weights = str(Path(pretrained).resolve()) if name == FINE_TUNED else ""
    resume = latest_checkpoint(run / "models") is not None
    ids = {**finetune_ids(datalist, run, weights, seed), **budget, "resume": resume, "output_dir": str(run / "logs")}
    return bundle_workflow(bundle, "train", CONFIGS, **ids)


def run_finetune(
    bundle: Path, name: str, seed: int, datalist: Path, run: Path, budget: dict, pretrained: str | Path
) -> dict:
    """Train (or resume) and evaluate one fine-tuning run (``name``: :data:`SCRATCH` or :data:`FINE_TUNED`, from
    ``pretrained``) with one seed in folder ``run``: its evaluation and report (overlays) on the test cases in
    ``run``, its result (also ``run/result.json``)."""
    weights = str(Path(pretrained).resolve()) if name == FINE_TUNED else ""
    ids = finetune_ids(datalist, run, weights, seed)
    trained, started = run / "train_seconds.json", run / "budget.json"
    if json.loads(started.read_text()) != budget if started.exists() else (run / "models").exists():
        raise UsageError(f"{run} was trained with another budget than {budget} (or an older version): delete it")
    if not trained.exists():  # an interrupted run continues from its last checkpoint
        write_text_atomic(started, json.dumps(budget) + "\n")
        tic, cpu = time.perf_counter(), time.process_time()
        workflow = train_workflow(bundle, name, seed, datalist, run, budget, pretrained)
        workflow.run()
        workflow.finalize()
        timing = {"wall": time.perf_counter() - tic, "cpu": time.process_time() - cpu}
        write_text_atomic(trained, json.dumps(timing) + "\n")
    timing = json.loads(trained.read_text())
    run_workflow(bundle, "eval", [*CONFIGS, "evaluate"], **ids, output_dir=str(run), evaluate_section="testing",
                 overwrite=True)  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    result = {
        "run": name,
        "seed": seed,
        "budget": budget,
        "pretrained": weights,
        "dice": summary["tasks"][TASK]["per_class"],
        "mean_dice": summary["mean_dice"],
        "train_seconds": round(timing["wall"], 1),
        "train_cpu_seconds": round(timing["cpu"], 1),
        "threads": torch.get_num_threads(),
        "curve": validation_curve(run / "logs", budget["iterations_per_epoch"]),
    }
    write_text_atomic(run / "result.json", json.dumps(result, indent=1) + "\n")
    return result


def summarise(results: Sequence[dict], threshold: float = THRESHOLD) -> list[dict]:
    """Per run (:data:`RUNS` order, those present) its seeds and the mean ± sd over seeds of the per-class test Dice,
    the mean Dice, the training time and the validation curve (per point, up to the shortest), and the iterations to
    reach ``threshold``: ``reach`` (mean ± sd over the seeds that reached it, None if none did) and ``reached`` /
    ``of``."""
    rows = []
    for name in [n for n in RUNS if any(r["run"] == n for r in results)]:
        runs = sorted((r for r in results if r["run"] == name), key=lambda r: r["seed"])
        points = min(len(r["curve"]["iterations"]) for r in runs)
        reach = [first_reach(r["curve"], threshold) for r in runs]
        reached = [i for i in reach if i is not None]
        rows.append({
            "run": name,
            "seeds": [r["seed"] for r in runs],
            "dice": {c: stats([r["dice"][c] for r in runs]) for c in runs[0]["dice"]},
            "mean_dice": stats([r["mean_dice"] for r in runs]),
            "train_seconds": stats([r["train_seconds"] for r in runs]),
            "curve": {"iterations": runs[0]["curve"]["iterations"][:points],
                      "val_dice": [stats([r["curve"]["val_dice"][i] for r in runs]) for i in range(points)]},
            "reach": stats(reached) if reached else None,
            "reached": len(reached),
            "of": len(runs),
        })  # fmt: skip
    return rows


def reach_cell(row: dict) -> str:
    """Iterations to the threshold: ``mean ± sd``, with ``(not reached k/N)`` when some seeds did not."""
    missed = row["of"] - row["reached"]
    if row["reach"] is None:
        return f"not reached {missed}/{row['of']}"
    text = cell(row["reach"], 1, 0)
    return text if not missed else f"{text} (not reached {missed}/{row['of']})"


def table(rows: Sequence[dict], budget: dict, settings: dict, threshold: float = THRESHOLD) -> str:
    """The rows of :func:`summarise` as Markdown (Dice in %), with a footer stating the budget, seeds, settings
    (``settings``: :func:`~uniseg_monai.apps.ablation.recipe` and ``pretrained``, ``threads``)."""
    classes = list(rows[0]["dice"])
    head = ["run", *classes, "mean", f"iterations to validation Dice {threshold:.2f}", "train (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], *(cell(r["dice"][c], 100, 1) for c in classes), cell(r["mean_dice"], 100, 1),
                 reach_cell(r), cell(r["train_seconds"], 1, 0)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({s for r in rows for s in r["seeds"]})
    sd = "mean ± sd (sample sd)" if len(seeds) > 1 else "one seed"
    s, b = settings, budget
    total = b["epochs"] * b["iterations_per_epoch"]
    held = s.get("constant_lr_fraction", 0)
    schedule = f"held for {held:.0%} of the epochs, then the poly decay" if held else "poly decay"
    footer = (
        f"Test Dice in % ({TASK}: a task unseen in pretraining), {sd} over seeds {', '.join(map(str, seeds))}. Both "
        f"runs: {total:,} iterations ({b['epochs']} epochs x {b['iterations_per_epoch']}), validation every "
        f"{b['val_interval']} epochs ({b['val_interval'] * b['iterations_per_epoch']:,} iterations; the evaluated "
        f"model is the best on validation), configs {' + '.join(f'{c}.json' for c in CONFIGS)}: {s['optimizer']} lr "
        f"{s['learning_rate']} ({schedule}), weight decay {s['weight_decay']}, batch {s['batch_size']}, patch "
        f"{'x'.join(map(str, s['patch_size']))}, features {s['features']}; fine-tuned from {s['pretrained']}; "
        f"{' or '.join(map(str, s['threads']))} torch thread(s) per run. Iterations to the threshold: the first "
        f"validation at or above it."
    )
    return "\n".join([*lines, "", footer])


def headline(rows: Sequence[dict], threshold: float = THRESHOLD) -> str:
    """One line saying what the table shows: the fine-tuned run's mean Dice margin over the run from scratch at the
    same budget and the iterations each took to reach the validation-Dice ``threshold``."""
    by = {r["run"]: r for r in rows}
    scratch, tuned = by[SCRATCH], by[FINE_TUNED]
    margin = 100 * (tuned["mean_dice"]["mean"] - scratch["mean_dice"]["mean"])
    seeds = "" if tuned["of"] == 1 else f" (mean over {tuned['of']} seeds)"

    def reach(r: dict) -> str:
        if r["reach"] is None:
            return "not reached"
        seeds = "" if r["reached"] == r["of"] else f" by {r['reached']} of {r['of']} seeds"
        return f"reached after {r['reach']['mean']:,.0f} iterations{seeds}"

    if tuned["reached"] == tuned["of"] and scratch["reached"] == scratch["of"]:
        when = f"reached after {tuned['reach']['mean']:,.0f} iterations instead of {scratch['reach']['mean']:,.0f}"
    elif tuned["reach"] is None and scratch["reach"] is None:
        when = f"reached by neither run within {max(tuned['curve']['iterations'] or [0]):,} iterations"
    else:
        when = f"{reach(tuned)} fine-tuned, {reach(scratch)} from scratch"
    budget = f"{margin:+.1f} mean Dice at the same budget{seeds}"
    return f"from the pretrained model: {budget}; validation Dice {threshold:.2f} {when}"


def curves_figure(rows: Sequence[dict], path: Path, threshold: float = THRESHOLD) -> None:
    """``path`` (PNG): validation mean Dice against iterations, one line per run (mean over seeds) with a band of
    ± 1 sd, the threshold dashed."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        x = r["curve"]["iterations"]
        mean = np.array([p["mean"] for p in r["curve"]["val_dice"]])
        sd = np.array([p["sd"] or 0.0 for p in r["curve"]["val_dice"]])
        line = ax.plot(x, mean, marker="o", ms=3, label=f"{r['run']} ({len(r['seeds'])} seed(s))")
        ax.fill_between(x, mean - sd, mean + sd, color=line[0].get_color(), alpha=0.15, lw=0)
    ax.axhline(threshold, color="grey", ls="--", lw=0.8, label=f"threshold {threshold:.2f}")
    ax.set(title=f"{TASK}: validation mean Dice", xlabel="iteration", ylabel="Dice", ylim=(0, 1))
    ax.legend(fontsize=8)
    figure.tight_layout()
    _save(figure, path)


def finetune_pair(
    out: Path, bundle: Path, datalist: Path, pretrained: Path, seeds: Sequence[int] = (0,), jobs: int | None = None,
    budget: dict | None = None, layout: str = "{out}/{folder}/seed_{seed}",
) -> tuple[dict, dict]:  # fmt: skip
    """The :data:`RUNS` with each seed, in parallel processes (``jobs`` at a time, default one per core up to the
    runs): run folders ``layout``; finished runs (``result.json`` of the same budget and pretrained model) reused.
    Returns results and errors by (run, seed)."""
    budget = budget or budget_of(bundle)
    folders = {(n, k): Path(layout.format(out=out, folder=f, seed=k)) for n, f in RUNS.items() for k in seeds}
    results = {}
    for key, run in folders.items():
        if (run / "result.json").exists():
            found = json.loads((run / "result.json").read_text())
            wanted = str(pretrained.resolve()) if key[0] == FINE_TUNED else ""
            if found["budget"] != budget or found["pretrained"] != wanted:
                raise UsageError(f"{run} was run with another budget or pretrained model: choose another --out or "
                                 "delete it")  # fmt: skip
            results[key] = found
    common = {"bundle": bundle, "datalist": datalist, "budget": budget, "pretrained": pretrained}
    todo = {key: {"name": key[0], "seed": key[1], "run": run, **common} for key, run in folders.items()
            if key not in results}  # fmt: skip
    failed = {}
    if todo:
        logs = layout.format(out=out, folder="<run>", seed="<k>") + "/console.log"
        done, failed = run_all(run_finetune, todo, jobs, "uniseg transfer", logs)
        results.update(done)
    return {key: results[key] for key in folders if key in results}, failed


def transfer(
    out: str | Path,
    seeds: int | str | Sequence[int] = 3,
    jobs: int | None = None,
    epochs: int | None = None,
    iterations: int | None = None,
    bundle: str | Path = FINETUNE_BUNDLES["btcv"],
    pretrained: str | Path | None = None,
    threshold: float = THRESHOLD,
) -> Path:
    """Fine-tune ``ph_kidneys`` (phantoms in ``OUT/data_btcv``) from scratch and from ``pretrained`` with each seed
    at the same budget (``epochs`` x ``iterations``, default ``configs/demo.json``'s), run folders
    ``OUT/<from_scratch|fine_tuned>/seed_<k>``, and write ``OUT/transfer.md`` / ``.json`` and ``OUT/curves.png``.
    Without ``pretrained`` the demo's pretraining is trained once into ``OUT/pretrained`` (reused when finished).
    Finished runs are reused, interrupted ones resume; failed runs are named (:class:`UniSegError`) after the others
    are tabled. Returns the Markdown file."""
    whole_numbers(epochs=epochs, iterations=iterations, jobs=jobs)
    seeds = seed_list(seeds)
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < threshold <= 1:
        raise UsageError(f"--threshold takes a validation Dice in (0, 1], got {threshold!r}")
    folder = find_bundle(bundle).resolve()
    if not all((folder / "configs" / f"{c}.json").is_file() for c in CONFIGS) or "pretrained" not in _ids(folder):
        raise UsageError(f"{folder} has no fine-tuning recipe configs/demo.json (uniseg_finetune_btcv has one)")
    if pretrained and not Path(pretrained).is_file():
        raise UsageError(f"--pretrained {pretrained} not found: give a pretrained model file (e.g. models/model.pt)")
    if pretrained:
        check_pretrained(folder, pretrained)
    out = Path(out).resolve()
    with study_folder(out, "transfer study"):  # one command per --out: a second is refused before any run starts
        budget = budget_of(folder, epochs, iterations)
        datalist = kidneys_datalist(out)
        model = Path(pretrained) if pretrained else pretrain(out, name="pretrained") / "models" / "model.pt"
        results, failed = finetune_pair(out, folder, datalist, model.resolve(), seeds, jobs, budget)
        if results:
            rows = summarise(list(results.values()), threshold)
            threads = sorted({r["threads"] for r in results.values()})
            settings = {**recipe(folder), "pretrained": str(model), "threads": threads}
            text = table(rows, budget, settings, threshold)
            if len(rows) == len(RUNS):
                text += "\n\n" + headline(rows, threshold) + "."
            if failed:
                text += "\n\nFailed (not in the table): " + ", ".join(f"{n} seed {k}" for n, k in failed) + "."
            report = {"budget": budget, "settings": settings, "threshold": threshold, "seeds": seeds, "runs": rows,
                      "results": list(results.values()),
                      "failed": [{"run": n, "seed": k, "error": e} for (n, k), e in failed.items()]}  # fmt: skip
            write_text_atomic(out / "transfer.json", json.dumps(report, indent=1) + "\n")
            write_text_atomic(out / "transfer.md", text + "\n")
            curves_figure(rows, out / "curves.png", threshold)
            print(text)
        if failed:
            raise failed_runs(failed, f"{out}/<run>/seed_<k>/console.log")
        return out / "transfer.md"


def _ids(bundle: Path) -> set[str]:
    """The top-level ids of ``bundle``'s :data:`CONFIGS`."""
    return {key for c in CONFIGS for key in json.loads((bundle / "configs" / f"{c}.json").read_text())}
