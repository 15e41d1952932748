"""Adding a task to a trained model, measured on the phantoms (issue 17; README 'Add a task to a trained model').

1. Pretrain the demo network on 3 of the 4 phantom tasks (ph_organs, ph_brain, ph_petct) and, as the reference, a
   fresh 4-task model with the same budget.
2. Add ph_liver (liver + liver tumour on the ph_organs CT volumes: a known organ, a new structure and a new meaning
   of label 2) with each mode (prompt, decoder, full) at the same, smaller budget; decoder and full mode both on
   ph_liver's cases alone and with rehearsal (the old tasks' cases too, ``--rehearse``, the default).
3. Add ph_kidneys (BTCV-like: two kidneys and the gallbladder, structures no phantom task has; 4 classes) to the
   4-task model in prompt mode.

Prints one Markdown table: Dice (%) of the new task and of each old task before / after, the old tasks' max |logit
change| on a probe image, trained parameters and time. Finished runs are reused (delete OUT to start over).

    python benchmarks/add_task_phantoms.py --out add_task_output            # ~25 min on 2 CPU cores
    python benchmarks/add_task_phantoms.py --out /tmp/x --epochs 2 --add_epochs 1 --iterations 4   # smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from uniseg_monai.apps.add_task import REPORT_FILE, add_task
from uniseg_monai.apps.demo import _workflow, kidneys_datalist
from uniseg_monai.data.phantoms import generate_phantoms

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "uniseg_pretrain"
OLD = ("ph_organs", "ph_brain", "ph_petct")
NEW = "ph_liver"
RUNS = (("prompt", False), ("decoder", False), ("decoder", True), ("full", False), ("full", True))  # (mode, rehearse)


def subset(datalist: Path, tasks: tuple[str, ...], dst: Path) -> Path:
    """``datalist`` restricted to ``tasks``, with ids 0..len(tasks)-1."""
    data = json.loads(datalist.read_text())
    out = {"tasks": {t: {**data["tasks"][t], "id": i} for i, t in enumerate(tasks)}}
    for section in ("training", "validation", "testing"):
        out[section] = [item for item in data[section] if item["task"] in tasks]
    dst.write_text(json.dumps(out, indent=1))
    return dst


def train(datalist: Path, run: Path, epochs: int, iterations: int) -> float:
    """Train the demo network on ``datalist`` into ``run``; seconds (reused: the recorded ones)."""
    seconds = run / "train_seconds.json"
    if not (run / "models" / "model.pt").exists():
        tic = time.perf_counter()
        ids = {"dataset_dir": str(datalist.parent), "datalist": str(datalist), "ckpt_dir": str(run / "models")}
        budget = {"epochs": epochs, "iterations_per_epoch": iterations, "val_interval": max(1, epochs // 4)}
        _workflow(BUNDLE, "train", ["train", "demo"], **ids, **budget, output_dir=str(run / "logs"))
        seconds.write_text(json.dumps(time.perf_counter() - tic))
    return json.loads(seconds.read_text())


def evaluate(models: Path, datalist: Path, out: Path, tasks: tuple[str, ...]) -> dict[str, float]:
    """Test Dice of the model in ``models`` on the test cases of ``tasks`` (each evaluated as its own task)."""
    dice = {}
    for task in tasks:
        folder = out / f"eval_{task}"
        if not (folder / "summary.json").exists():
            ids = {"dataset_dir": str(datalist.parent), "datalist": str(datalist), "ckpt_dir": str(models)}
            _workflow(BUNDLE, "eval", ["train", "demo", "evaluate"], **ids, output_dir=str(folder),
                      evaluate_section="testing", task=task, write_report=False, overwrite=True)  # fmt: skip
        dice[task] = json.loads((folder / "summary.json").read_text())["tasks"][task]["dice"]
    return dice


def extend(
    base: Path, datalist: Path, task: str, mode: str, out: Path, epochs: int, iterations: int, rehearse: bool = False
) -> dict:
    """``uniseg add-task`` of ``task`` onto the model file ``base`` into ``out``; its report and seconds."""
    if not (out / REPORT_FILE).exists():
        tic = time.perf_counter()
        add_task(str(datalist), task, str(BUNDLE), mode, str(out), str(base), ["demo"], rehearse=rehearse,
                 epochs=epochs, iterations_per_epoch=iterations, val_interval=max(1, epochs // 2))  # fmt: skip
        (out / "train_seconds.json").write_text(json.dumps(time.perf_counter() - tic))
    report = json.loads((out / REPORT_FILE).read_text())
    return {**report, "seconds": json.loads((out / "train_seconds.json").read_text())}


def main(out: Path, epochs: int, add_epochs: int, iterations: int) -> None:
    full = out / "data" / "datalist.json"
    if not full.exists():
        generate_phantoms(full.parent)
    old = subset(full, OLD, full.with_name("datalist_3tasks.json"))
    rows = []
    seconds = train(old, out / "base_3tasks", epochs, iterations)
    before = evaluate(out / "base_3tasks" / "models", old, out / "base_3tasks", OLD)
    rows.append({"run": f"base: {len(OLD)} tasks", "dice": before, "seconds": seconds, "change": None, "params": None})
    for mode, rehearse in RUNS:
        run = out / f"add_{NEW}_{mode}{'_rehearsal' if rehearse else ''}"
        base = out / "base_3tasks" / "models" / "model.pt"
        report = extend(base, full, NEW, mode, run, add_epochs, iterations, rehearse)
        dice = evaluate(run, full, run, (*OLD, NEW))
        change = max(report["old_tasks_max_abs_logit_change"].values())
        name = f"+ {NEW}, {mode}" + ("" if mode == "prompt" else ", with rehearsal" if rehearse else f", {NEW} only")
        rows.append({"run": name, "dice": dice, "seconds": report["seconds"], "change": change,
                     "params": report["trainable_parameters"]})  # fmt: skip
    seconds = train(full, out / "fresh_4tasks", epochs, iterations)
    fresh = evaluate(out / "fresh_4tasks" / "models", full, out / "fresh_4tasks", (*OLD, NEW))
    rows.append({"run": "fresh 4-task model", "dice": fresh, "seconds": seconds, "change": None, "params": None})
    kidneys = kidneys_datalist(out)
    run = out / "add_ph_kidneys_prompt"
    report = extend(out / "fresh_4tasks" / "models" / "model.pt", kidneys, "ph_kidneys", "prompt", run, add_epochs,
                    iterations)  # fmt: skip
    dice = evaluate(run, kidneys, run, ("ph_kidneys",))
    rows.append({"run": "4-task model + ph_kidneys, prompt", "dice": dice, "seconds": report["seconds"],
                 "change": max(report["old_tasks_max_abs_logit_change"].values()),
                 "params": report["trainable_parameters"]})  # fmt: skip
    tasks = [*OLD, NEW, "ph_kidneys"]
    head = ["run", *tasks, "old tasks' max logit change", "trained parameters", "train (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], *(f"{100 * r['dice'][t]:.1f}" if t in r["dice"] else "" for t in tasks),
                 "" if r["change"] is None else f"{r['change']:.3g}", "all" if r["params"] is None else
                 f"{r['params']:,}", f"{r['seconds']:.0f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    budget = f"pretraining {epochs} x {iterations} iterations, adding {add_epochs} x {iterations} (batch 2)"
    text = "\n".join([*lines, "", f"Test Dice (%) on the phantoms' test cases; {budget}; configs/demo.json settings."])
    (out / "add_task.md").write_text(text + "\n")
    (out / "add_task.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("add_task_output"))
    parser.add_argument("--epochs", type=int, default=40, help="pretraining epochs (demo: 40)")
    parser.add_argument("--add_epochs", type=int, default=10, help="epochs of each add-task run")
    parser.add_argument("--iterations", type=int, default=40, help="iterations per epoch")
    args = parser.parse_args()
    main(args.out.resolve(), args.epochs, args.add_epochs, args.iterations)
