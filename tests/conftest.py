"""Shared test helpers: the ../shared folder (fixtures, real samples) beside the project, the phantoms and the tiny
model ``uniseg predict`` tests share."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


def shared_path(relative: str) -> Path:
    """A path under ../shared; missing data fails under CI=true and skips elsewhere."""
    path = SHARED / relative
    if not path.exists():
        message = f"{path} is missing: tests need the ../shared folder beside the project"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The tests' tiny networks run faster on one thread than on two cores shared with data loading;
    ``UNISEG_TEST_THREADS=N`` runs them on N (``make test-isa`` checks the exactness tests on 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("UNISEG_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def official_fixture() -> dict:
    """The tiny official-architecture checkpoint with reference outputs (official (z, y, x) axes)."""
    return torch.load(shared_path("fixtures/official_uniseg/official_uniseg_tiny.pt"), weights_only=True)


def zyx_to_xyz(t: torch.Tensor) -> torch.Tensor:
    """(B, C, Z, Y, X) <-> (B, C, X, Y, Z)."""
    return t.permute(0, 1, 4, 3, 2)


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    """The phantom data set (4 tasks, 2 of them on the same CT volumes); returns its datalist."""
    from uniseg_monai.data.phantoms import generate_phantoms

    return generate_phantoms(tmp_path_factory.mktemp("phantoms"))


def tiny_bundle(official_fixture: dict, kind: str, name: str, root: Path) -> Path:
    """A copy of bundles/<name> whose inference.json describes the official fixture's tiny ``kind`` network
    (upstream / downstream; pure JSON edits)."""
    from uniseg_monai.model_io.official import infer_network_def

    bundle = shutil.copytree(BUNDLES / name, root / name)
    network_def = infer_network_def(official_fixture[f"{kind}_state_dict"])
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    for key in ("features", "kernel_sizes", "strides"):
        config[key] = network_def[key]
    config["patch_size"] = network_def.get("patch_size", config["patch_size"])
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    return bundle


HOLDER = """
import sys
from uniseg_monai.core.locks import owned
with owned(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()
"""


@contextmanager
def held_by_another_process(folder: Path, what: str) -> Iterator[int]:
    """``folder`` owned (:func:`uniseg_monai.core.locks.owned`) by a live child process for ``what`` during the block;
    yields the child's pid. The child releases it when the block ends."""
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), what], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "held"
        yield child.pid
    finally:
        child.communicate(timeout=60)  # closes its stdin: it releases the folder and ends


PREDICT_BUNDLE = BUNDLES / "uniseg_pretrain"
PREDICT_TINY = {"patch_size": [64, 64, 32], "base_features": 4}  # the settings predict_model is trained with


@pytest.fixture(scope="session")
def predict_model(phantoms, tmp_path_factory) -> Path:
    """Checkpoint of a tiny model (:data:`PREDICT_TINY`) trained through the pretrain bundle for one epoch of 2
    iterations on the 4 phantom tasks, validated (which saves ``model.pt``) on one PET/CT case only, to save time;
    trained once per session for every ``uniseg predict`` test."""
    from monai.bundle import ConfigWorkflow

    root = tmp_path_factory.mktemp("predict_model")
    datalist = json.loads(phantoms.read_text())
    datalist["validation"] = [i for i in datalist["validation"] if i["task"] == "ph_petct"][:1]
    for item in datalist["training"] + datalist["validation"]:
        for key in ("image", "label"):
            item[key] = [str(phantoms.parent / f) for f in item[key]] if isinstance(item[key], list) else (
                str(phantoms.parent / item[key]))  # fmt: skip
    (root / "datalist.json").write_text(json.dumps(datalist))
    wf = ConfigWorkflow(
        config_file=str(PREDICT_BUNDLE / "configs" / "train.json"),
        meta_file=str(PREDICT_BUNDLE / "configs" / "metadata.json"),
        logging_file=str(PREDICT_BUNDLE / "configs" / "logging.conf"),
        workflow_type="train",
        bundle_root=str(PREDICT_BUNDLE),
        dataset_dir=str(root),
        ckpt_dir=str(root / "models"),
        output_dir=str(root / "eval"),
        **PREDICT_TINY,
        iterations_per_epoch=2,
        epochs=1,
        val_interval=1,
        num_workers=0,
        cache_rate=0.0,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    return root / "models" / "model.pt"
