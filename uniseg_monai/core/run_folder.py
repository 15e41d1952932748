"""The run folder (a bundle's ``ckpt_dir``): never overwrite an earlier run, find the checkpoint to resume from."""

from __future__ import annotations

import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

CHECKPOINT_PATTERN = re.compile(r"^checkpoint_epoch=(\d+)\.pt$")
PRETRAINED_NAME = "pretrained.pt"  # a fine-tuning bundle's starting point in models/, not an earlier run's output


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The ``checkpoint_epoch=N.pt`` with the highest N in ``ckpt_dir``, or None."""
    folder = Path(ckpt_dir)
    found = [
        (int(m.group(1)), p) for p in folder.glob("checkpoint_epoch=*.pt") if (m := CHECKPOINT_PATTERN.match(p.name))
    ]
    return max(found)[1] if found else None


def resume_checkpoint(ckpt_dir: str | Path) -> str:
    """The checkpoint a ``--resume true`` run continues from; a clear error when there is none."""
    found = latest_checkpoint(ckpt_dir)
    if found is None:
        raise FileNotFoundError(
            f"{ckpt_dir}: no checkpoint_epoch=N.pt to resume from; drop --resume to start a new run"
        )
    return str(found)


def check_run_dir(ckpt_dir: str | Path, resume: bool, in_place: bool = False) -> bool:
    """Refuse to start a new training run over an earlier one (its checkpoints would be overwritten).

    ``in_place``: a MONAI Label training request (it continues from and replaces ``model.pt``, as MONAI Label
    does for every bundle); the current ``model.pt`` is first copied to ``model_before_<UTC time>.pt``, which
    MONAI Label then offers in its ``model_filename`` option. Returns True so it can sit in a bundle's
    ``initialize`` list.
    """
    folder = Path(ckpt_dir)
    if resume:
        resume_checkpoint(folder)  # none to resume from: fail now, not after the data are cached
    if in_place:
        model = folder / "model.pt"
        if model.is_file():
            stats = (model.stat().st_mtime, model.stat().st_size)  # copy2 keeps the mtime
            kept = [p for p in folder.glob("model_before_*.pt") if (p.stat().st_mtime, p.stat().st_size) == stats]
            if not kept:  # once per model (MONAI Label may run `initialize` twice)
                stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
                shutil.copy2(model, folder / f"model_before_{stamp}.pt")
        return True
    if not resume and folder.is_dir():
        earlier = sorted(p.name for p in folder.glob("*.pt") if p.name != PRETRAINED_NAME)
        if earlier:
            raise FileExistsError(
                f"{folder} already holds {', '.join(earlier)} from an earlier run; pass --resume true to continue "
                "it, or choose another --ckpt_dir (nothing was overwritten)"
            )
    return True


REPORT_FILES = ("per_case.csv", "summary.json", "report.html", "predictions")  # what an evaluation run writes
# every file an evaluation run (and its report) writes into its output_dir: what --overwrite true removes first
EVALUATION_OUTPUTS = (
    "per_case.csv", "summary.csv", "summary.md", "per_class.csv", "per_class.md", "summary.json", "report.html",
    "curves.png", "dice.png", "prompt.png", "overlay_*.png", "predictions/*_seg.nii.gz",
)  # fmt: skip


def check_output_dir(output_dir: str | Path, overwrite: bool) -> bool:
    """Refuse to replace an earlier evaluation's report in ``output_dir`` unless ``overwrite`` (bundle id
    ``overwrite``); with it, remove the earlier run's outputs (:data:`EVALUATION_OUTPUTS`, nothing else) so the new
    report cannot show the earlier model's maps. True, for ``initialize``."""
    folder = Path(output_dir)
    earlier = [name for name in REPORT_FILES if (folder / name).exists()]
    if earlier and not overwrite:
        raise FileExistsError(
            f"{folder} already holds {', '.join(earlier)} of an earlier evaluation; pass --overwrite true to replace "
            "them, or choose another --output_dir (nothing was overwritten)"
        )
    if earlier:
        for path in (p for pattern in EVALUATION_OUTPUTS for p in folder.glob(pattern) if p.is_file()):
            path.unlink()
        if (folder / "predictions").is_dir() and not any((folder / "predictions").iterdir()):
            (folder / "predictions").rmdir()
    return True


def check_predictions_dir(output_dir: str | Path, overwrite: bool) -> bool:
    """Refuse to write a bundle inference run's maps into ``<output_dir>/predictions`` over those of an earlier run
    unless ``overwrite`` (bundle id ``overwrite``). True, for a bundle's ``run`` list."""
    folder = Path(output_dir) / "predictions"
    earlier = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
    if earlier and not overwrite:
        raise FileExistsError(
            f"{folder} already holds {len(earlier)} prediction(s) of an earlier run ({earlier[0]}, ...); pass "
            "--overwrite true to replace them, or choose another --output_dir (nothing was overwritten)"
        )
    return True
