"""``uniseg transfer`` and the demo's fine-tuning pair (uniseg_monai.apps.transfer): the table, threshold and curve
aggregation on synthetic numbers, the fine-tuning run starting from the pretrained weights, a small-budget run of
the command for its files, and its refusals; run at a reduced budget for its mechanics, not its science."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser

from uniseg_monai.apps import transfer as study
from uniseg_monai.cli import main
from uniseg_monai.networks import UniSeg, UniSegBackbone

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "uniseg_finetune_btcv"
CLASSES = ("right kidney", "left kidney", "gallbladder")


def result(run: str, seed: int, dice: float, curve: list[float]) -> dict:
    """A run's result as :func:`~uniseg_monai.apps.transfer.run_finetune` returns it (validation every 150)."""
    iterations = [150 * (i + 1) for i in range(len(curve))]
    return {"run": run, "seed": seed, "dice": dict.fromkeys(CLASSES, dice), "mean_dice": dice, "train_seconds": 100.0,
            "threads": 1, "curve": {"iterations": iterations, "val_dice": curve}}  # fmt: skip


def synthetic() -> list[dict]:
    scratch = [[0.1, 0.5, 0.85], [0.1, 0.6, 0.7], [0.2, 0.7, 0.79]]  # reaches 0.8 with seed 0 only
    tuned = [[0.5, 0.81, 0.9], [0.6, 0.9, 0.9], [0.85, 0.9, 0.95]]  # reaches 0.8 at 300, 300, 150
    return [
        *(result(study.SCRATCH, k, 0.80 + 0.01 * k, c) for k, c in enumerate(scratch)),
        *(result(study.FINE_TUNED, k, 0.90 + 0.01 * k, c) for k, c in enumerate(tuned)),
    ]


def test_summary_gives_mean_sd_over_seeds_and_the_iterations_to_the_threshold():
    rows = study.summarise(list(reversed(synthetic())))
    assert [r["run"] for r in rows] == [study.SCRATCH, study.FINE_TUNED]  # the runs' order, not the results'
    scratch, tuned = rows
    assert scratch["seeds"] == [0, 1, 2] and scratch["mean_dice"]["mean"] == pytest.approx(0.81)
    assert scratch["dice"]["gallbladder"]["sd"] == pytest.approx(0.01)
    assert scratch["curve"]["iterations"] == [150, 300, 450]
    assert scratch["curve"]["val_dice"][1]["mean"] == pytest.approx(0.6)
    assert (scratch["reached"], scratch["of"], scratch["reach"]) == (1, 3, {"mean": 450.0, "sd": None})
    assert tuned["reached"] == 3 and tuned["reach"]["mean"] == pytest.approx(250.0)
    assert study.first_reach({"iterations": [1, 2], "val_dice": [0.1, 0.2]}, 0.8) is None
    assert study.reach_cell(scratch) == "450 (not reached 2/3)" and study.reach_cell(tuned) == "250 ± 87"
    assert study.reach_cell({**scratch, "reach": None, "reached": 0}) == "not reached 3/3"


def test_the_table_the_headline_and_the_figure(tmp_path):
    rows = study.summarise(synthetic())
    settings = {**study.recipe(BUNDLE), "pretrained": "P/model.pt", "threads": [1]}
    budget = {"epochs": 3, "iterations_per_epoch": 150, "val_interval": 1}
    lines = study.table(rows, budget, settings).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head == ["run", *CLASSES, "mean", "iterations to validation Dice 0.80", "train (s)"]
    assert len(lines) == 2 + 2 + 2  # header, rule, 2 runs, blank, footer
    tuned = [c.strip() for c in lines[3].strip("|").split("|")]
    assert tuned[0] == "fine-tuned" and tuned[head.index("mean")] == "91.0 ± 1.0" and tuned[-2] == "250 ± 87"
    assert "seeds 0, 1, 2" in lines[-1] and "450 iterations (3 epochs x 150)" in lines[-1] and "P/model.pt" in lines[-1]
    assert "lr 0.003 (held for 50% of the epochs, then the poly decay)" in lines[-1]  # the demo's schedule, named
    assert study.headline(rows) == (
        "from the pretrained model: +10.0 mean Dice at the same budget (mean over 3 seeds); validation Dice 0.80 "
        "reached after 250 iterations fine-tuned, reached after 450 iterations by 1 of 3 seeds from scratch"
    )
    one = study.summarise([r for r in synthetic() if r["seed"] == 1])
    assert study.headline(one).endswith(
        "validation Dice 0.80 reached after 300 iterations fine-tuned, not reached from scratch"
    )
    assert study.headline(study.summarise([r for r in synthetic() if r["seed"] == 0])).endswith(
        "reached after 300 iterations instead of 450"
    )
    high = study.summarise([r for r in synthetic() if r["seed"] == 1], threshold=0.99)
    assert study.headline(high, threshold=0.99).endswith(
        "validation Dice 0.99 reached by neither run within 450 iterations"
    )
    study.curves_figure(rows, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def demo_pretrained(path: Path, seed: int = 3) -> Path:
    """A pretrain-bundle-style model file of a UniSeg with the fine-tuning demo's network (``configs/demo.json``),
    every tensor random (norm weights and biases too, so that a fresh network cannot match it by chance)."""
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / f"{c}.json") for c in study.CONFIGS])
    arch = {k: parser.get_parsed_content(k) for k in ("features", "kernel_sizes", "strides", "patch_size")}
    torch.manual_seed(seed)
    net = UniSeg(num_tasks=4, num_classes=3, **arch)
    state = {k: v + torch.randn_like(v) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    torch.save({"model": state}, path)
    return path


def test_the_demo_fine_tuning_starts_from_the_pretrained_weights(tmp_path):
    """The trainer the demo and ``uniseg transfer`` build for the fine-tuned run (train_workflow: the same configs
    and ids), checked before its first iteration: every encoder-decoder tensor is the pretrained model's (the first
    transposed conv without the prompt's channel), only the heads are new."""
    datalist = study.kidneys_datalist(tmp_path)
    pretrained = demo_pretrained(tmp_path / "model.pt")
    source = torch.load(pretrained, weights_only=True)["model"]
    budget = study.budget_of(BUNDLE, epochs=1, iterations=1)
    workflow = study.train_workflow(BUNDLE, study.FINE_TUNED, 0, datalist, tmp_path / "run", budget, pretrained)
    trainer = workflow.parser.get_parsed_content("train#trainer")
    checked: dict[str, int] = {}

    @trainer.on(Events.ITERATION_STARTED(once=1))
    def compare(engine) -> None:
        network = engine.network
        assert isinstance(network, UniSegBackbone)
        for key, tensor in network.state_dict().items():
            if key.startswith("heads."):
                checked["heads"] = checked.get("heads", 0) + 1
                continue
            expected = source[key]
            if key == UniSegBackbone.prompt_widened_key:
                expected = expected[: expected.shape[0] - 1]
            assert torch.equal(tensor.cpu(), expected), key
            checked["transferred"] = checked.get("transferred", 0) + 1
        engine.terminate()

    workflow.run()
    workflow.finalize()
    assert checked["heads"] >= 1 and checked["transferred"] > 40  # the check ran, over the whole encoder-decoder


def test_the_check_fails_when_nothing_is_transferred(tmp_path):
    """The same comparison against a network trained from scratch finds differing tensors."""
    datalist = study.kidneys_datalist(tmp_path)
    source = torch.load(demo_pretrained(tmp_path / "model.pt"), weights_only=True)["model"]
    budget = study.budget_of(BUNDLE, epochs=1, iterations=1)
    workflow = study.train_workflow(BUNDLE, study.SCRATCH, 0, datalist, tmp_path / "run", budget, tmp_path / "model.pt")
    network = workflow.parser.get_parsed_content("network")
    keys = [k for k in network.state_dict() if not k.startswith("heads.") and k != UniSegBackbone.prompt_widened_key]
    assert all(not torch.equal(network.state_dict()[k], source[k]) for k in keys)
    workflow.finalize()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--seeds", "0"], "--seeds takes a count"),
        (["--pretrained", "missing.pt"], "--pretrained missing.pt not found"),
        (["--bundle", "no_such_bundle"], "bundle 'no_such_bundle' not found"),
        (["--bundle", "uniseg_finetune_vs"], "no fine-tuning recipe configs/demo.json"),
        (["--iterations", "2.5"], "--iterations takes a whole number"),
        (["--threshold", "0"], "--threshold takes a validation Dice"),
        (["--jobs", "0"], "--jobs must be >= 1, got 0"),
        (["--epochs", "0"], "--epochs must be >= 1, got 0"),
        # checked with the reader and the transfer the fine-tuning uses, before the pretraining or any run
        (["--pretrained", "script.sh"], "script.sh: not a readable PyTorch file"),
        (["--pretrained", "other.pt"], "is missing from the checkpoint: not a pretrained model of this architecture"),
    ],
)
def test_bad_input_is_one_line(options, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "script.sh").write_text("#!/bin/bash\necho not a model\n")
    torch.save({"model": {"conv.weight": torch.zeros(2, 1, 3, 3, 3)}}, tmp_path / "other.pt")
    with pytest.raises(SystemExit) as exited:
        main(["transfer", "--out", str(tmp_path / "out"), *options])
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(err) == 1 and err[0].startswith("uniseg: error: ") and message in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_transfer_writes_its_table_figure_and_reports_and_reuses_finished_runs(tmp_path, monkeypatch):
    pretrained = demo_pretrained(tmp_path / "model.pt")
    out = tmp_path / "out"
    options = {"seeds": 1, "jobs": 2, "epochs": 2, "iterations": 2, "pretrained": pretrained}
    md = study.transfer(out, **options)
    lines = md.read_text().splitlines()
    assert lines[0].startswith("| run | right kidney | left kidney | gallbladder | mean | iterations to validation")
    assert [line.split("|")[1].strip() for line in lines[2:4]] == [study.SCRATCH, study.FINE_TUNED]
    assert "one seed over seeds 0" in md.read_text() and "from the pretrained model: " in lines[-1]
    report = json.loads((out / "transfer.json").read_text())
    assert [r["run"] for r in report["runs"]] == [study.SCRATCH, study.FINE_TUNED]
    assert report["runs"][0]["curve"]["iterations"] == [4]  # validation every min(5, 2) epochs
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    for folder in study.RUNS.values():
        run = out / folder / "seed_0"
        assert (run / "overlay_ph_kidneys.png").is_file() and "overlay_ph_kidneys.png" in (
            run / "report.html"
        ).read_text()
    monkeypatch.setattr(study, "run_all", lambda *a: pytest.fail("a finished run was run again"))
    assert study.transfer(out, **options) == md
