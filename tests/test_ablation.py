"""``uniseg ablate``: seeds as separate runs in parallel processes, the mean ± sd table with the wrong-task rates and
the task-blind floor, the learning curves from the kept checkpoints, a failed run named while the others finish,
finished runs reused; run at a reduced budget for its mechanics, not its science."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from uniseg_monai.apps import ablation
from uniseg_monai.apps.ablation import ablate, seed_list, summarise, table
from uniseg_monai.cli import main
from uniseg_monai.core.errors import UniSegError, UsageError

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "uniseg_pretrain"
TASKS = ("ph_organs", "ph_liver", "ph_brain", "ph_petct")


def result(variant: str, seed: int, score: float) -> dict:
    """A run's result as :func:`~uniseg_monai.apps.ablation.run_variant` returns it, every score ``score``."""
    curve = {"iterations": [40, 80], "tumour_dice": [score, score], "tumour_as_spleen": [score, score],
             "spleen_as_tumour": [score, score]}  # fmt: skip
    metrics = {key: score for key, _, _ in ablation.COLUMNS.values()}
    return {"variant": variant, "seed": seed, "parameters": 1234, "dice": dict.fromkeys(TASKS, score), **metrics,
            "threads": 1, "curve": curve}  # fmt: skip


def test_seeds_are_a_count_or_a_list():
    assert seed_list(3) == [0, 1, 2] and seed_list("3") == [0, 1, 2]
    assert seed_list([0, 4, 7]) == [0, 4, 7] and seed_list("0,4,7") == [0, 4, 7] and seed_list((5,)) == [5]
    for bad in (0, [1, 1], "a", [-1], True):
        with pytest.raises(UsageError, match="--seeds takes a count"):
            seed_list(bad)


def test_the_table_gives_mean_and_sd_over_seeds_and_labels_the_floor():
    rows = summarise([result("uniseg", 0, 0.8), result("task_blind", 0, 0.3), result("uniseg", 1, 0.9)])
    assert [r["variant"] for r in rows] == ["uniseg", "task_blind"] and rows[0]["seeds"] == [0, 1]
    assert rows[0]["tumour_dice"]["mean"] == pytest.approx(0.85) and rows[0]["tumour_dice"]["sd"] == pytest.approx(
        0.0707107
    )
    assert rows[1]["tumour_dice"]["sd"] is None  # one seed: no sd
    assert rows[0]["curve"]["tumour_as_spleen"][1]["mean"] == pytest.approx(0.85)
    settings = ablation.recipe(BUNDLE) | {"epochs": 2, "iterations_per_epoch": 40, "curve_every": 1}
    lines = table(rows, settings, [0, 1], [1]).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[:6] == ["variant", "parameters", *TASKS] and "tumour as spleen (%)" in head
    uniseg = [c.strip() for c in lines[2].strip("|").split("|")]
    assert uniseg[head.index("tumour (ph_liver 2)")] == "85.0 ± 7.1"
    assert uniseg[head.index("prompt effect (voxels)")] == "1 ± 0"
    assert lines[3].startswith("| task_blind (floor") and "| 30.0 |" in lines[3]
    assert "seeds 0, 1" in lines[-1] and "80 iterations (2 epochs x 40)" in lines[-1]


@pytest.mark.integration
def test_ablate_runs_each_seed_apart_names_a_failed_run_and_reuses_finished_ones(tmp_path, capsys, monkeypatch):
    bundle = shutil.copytree(BUNDLE, tmp_path / "bundle", ignore=shutil.ignore_patterns("eval", "runs"))
    broken = {"network_def": {"_target_": "uniseg_monai.networks.NoSuchNetwork"}}
    (bundle / "configs" / "variants" / "broken.json").write_text(json.dumps(broken))
    out, budget = tmp_path / "out", {"epochs": 2, "iterations": 1, "curve_every": 1, "seeds": 2, "bundle": bundle}
    budget |= {"overlap": 0, "cache_rate": 0}  # bundle ids: fewer sliding windows, no up-front caching
    with pytest.raises(UniSegError, match=r"2 of 4 run\(s\) failed \(broken seed 0, broken seed 1\)"):
        ablate(out, variants=["task_blind", "broken"], jobs=2, **budget)
    printed = capsys.readouterr().out
    assert printed.count("uniseg ablate: broken seed") == 2 and "| task_blind (floor" in printed
    report = json.loads((out / "ablation.json").read_text())
    runs = {(r["variant"], r["seed"]): r for r in report["runs"]}
    assert set(runs) == {("task_blind", 0), ("task_blind", 1)} and len(report["failed"]) == 2
    assert runs["task_blind", 0]["mean_dice"] != runs["task_blind", 1]["mean_dice"]  # two seeds, two runs
    for seed, run in runs.items():
        folder = out / "task_blind" / f"seed_{seed[1]}"
        assert (folder / "models" / "model.pt").is_file() and (folder / "console.log").stat().st_size > 0
        curve = run["curve"]
        assert curve["iterations"] == [1, 2]  # one point per kept checkpoint: epochs 1 and 2 (the final model)
        assert (
            curve["tumour_dice"][-1] == run["tumour_dice"] and curve["spleen_as_tumour"][-1] == run["spleen_as_tumour"]
        )  # the final point is the table's model, scored on the same (shared) volumes
        assert run["prompt_effect_voxels"] == 0  # switching the task id cannot change its maps
        assert [p.name for p in (folder / "models").glob("checkpoint_epoch=*.pt")] == ["checkpoint_epoch=2.pt"]
    row = report["variants"][0]
    assert row["seeds"] == [0, 1] and row["tumour_dice"]["sd"] is not None and len(row["curve"]["tumour_dice"]) == 2
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    text = (out / "ablation.md").read_text()
    assert " ± " in text and "AdamW" in text and "Failed (not in the table): broken seed 0, broken seed 1" in text

    monkeypatch.setattr(ablation, "run_all", lambda *a: pytest.fail("a finished run was run again"))
    ablate(out, variants=["task_blind"], **budget)  # both runs reused
    assert json.loads((out / "ablation.json").read_text())["runs"] == report["runs"]
    with pytest.raises(UsageError, match="another budget"):
        ablate(out, variants=["task_blind"], **{**budget, "epochs": 3})


def test_ablate_finds_its_bundle_from_any_folder(tmp_path, monkeypatch, capsys):
    """The default bundle is a name, resolved as predict resolves it (not a path relative to the repository); bad
    options are refused before anything is written."""
    monkeypatch.chdir(tmp_path)
    for args, expected in [
        (["--variants", "nope"], "'dodnet'"),
        (["--bundle", "no_such_bundle"], "not found"),
        (["--seeds", "[1,1]"], "--seeds takes"),
        (["--jobs", "-1"], "--jobs must be"),
        (["--jobs", "0"], "--jobs must be >= 1, got 0"),
        (["--curve_every", "0"], "--curve_every must be >= 1, got 0"),
        (["--curve_every", "99"], "--curve_every must be"),
        (["--epochs", "abc"], "--epochs takes a whole number, got 'abc'"),
        (["--iterations", "2.5"], "--iterations takes a whole number"),
    ]:
        with pytest.raises(SystemExit) as done:
            main(["ablate", "--out", "out", *args])
        lines = capsys.readouterr().err.strip().splitlines()
        assert done.value.code == 2 and len(lines) == 1 and expected in lines[0], lines
    assert not list(tmp_path.iterdir())  # refused before the phantoms are generated


@pytest.mark.parametrize("command", ["ablate", "transfer"])
def test_a_study_out_that_is_a_file_or_in_use_is_one_line_and_nothing_is_written(tmp_path, capsys, command):
    """--out a file: "is a file"; --out owned by a live study command (its lock): refused before any run starts, naming
    that command's pid, so nothing is written into its folder (its runs' console logs stay its own)."""
    (tmp_path / "file").write_text("mine")
    with pytest.raises(SystemExit) as done:
        main([command, "--out", str(tmp_path / "file"), "--seeds", "1"])
    lines = capsys.readouterr().err.strip().splitlines()
    expected = f"uniseg: error: --out {tmp_path / 'file'} is a file, but it must be a folder: give a new folder"
    assert done.value.code == 2 and len(lines) == 1 and lines[0].startswith(expected), lines
    assert (tmp_path / "file").read_text() == "mine"

    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from uniseg_monai.core.locks import acquire; "
         f"acquire({str(out)!r}, 'study'); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as done:
            main([command, "--out", str(out), "--seeds", "1", "--epochs", "1", "--iterations", "1"])
    finally:
        holder.communicate("")
    lines = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"uniseg: error: {out} is in use by another study: pid {holder.pid} on "), lines
    assert not out.exists()  # the holder made it and removed it, empty again: nothing else was written into it


def test_failed_runs_name_each_run_its_logs_and_the_retry():
    from uniseg_monai.apps.runs import failed_runs

    failed = {("uniseg", 0): "RuntimeError: x", ("dodnet", 2): "ValueError: y"}
    assert str(failed_runs(failed, "OUT/<variant>/seed_<k>/console.log", 12)) == (
        "2 of 12 run(s) failed (uniseg seed 0, dodnet seed 2): see OUT/<variant>/seed_<k>/console.log; run the same "
        "command again to retry them (finished runs are reused)"
    )
    assert str(failed_runs({("fine_tuned", 1): "e"}, "OUT/<run>/seed_<k>/console.log")).startswith(
        "1 run(s) failed (fine_tuned seed 1): see OUT/<run>/seed_<k>/console.log;"
    )
