"""Shared test helpers: the ../shared folder (fixtures, real samples) beside the project, the phantoms and the tiny
model ``uniseg predict`` tests share; the ``integration`` tier (``make test-fast`` runs ``-m "not integration"``)."""

from __future__ import annotations

import json
import locale
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
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


def integration(fixture: Callable) -> Callable:
    """Declares a fixture (under ``@pytest.fixture``) that trains a model or runs a bundle workflow: every test using
    it, directly or through other fixtures, is marked ``integration``."""
    fixture.integration = True
    return fixture


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks ``integration`` the tests that use an :func:`integration` fixture."""
    for item in items:
        definitions = (d for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs)
        if any(getattr(d.func, "integration", False) for d in definitions):
            item.add_marker(pytest.mark.integration)


_Popen = subprocess.Popen


def _reimports(command) -> bool:
    """Whether a child process command starts Python on a module (the CLI, ``monai.bundle``, torchrun) or the
    ``uniseg`` script: seconds of imports each time. A ``python -c`` snippet of the standard library is cheap."""
    argv = [command] if isinstance(command, str | os.PathLike) else list(command)
    program = Path(argv[0]).name
    return program == "uniseg" or (program.startswith("python") and "-m" in argv[1:2])


@pytest.fixture(autouse=True)
def tiers_and_process_state(request):
    """Keeps the unit tier a unit tier and tests independent of their order: a test without the ``integration`` mark
    that starts a Python module process fails here; so does a test that leaves the C locale or the working folder
    changed (GDCM's DICOM writer left LC_CTYPE "C": later tests read their children's UTF-8 output as ASCII)."""

    class Refusing(_Popen):
        def __init__(self, command, *args, **kwargs):
            if _reimports(command):
                pytest.fail(f"{request.node.nodeid} starts {command!r}: mark it @pytest.mark.integration, or call "
                            "the CLI's main([...]) in the test's process")  # fmt: skip
            super().__init__(command, *args, **kwargs)

    if request.node.get_closest_marker("integration") is None:
        subprocess.Popen = Refusing
    before = locale.setlocale(locale.LC_ALL), os.getcwd()
    yield
    subprocess.Popen = _Popen
    after = locale.setlocale(locale.LC_ALL), os.getcwd()
    if after != before:
        locale.setlocale(locale.LC_ALL, before[0])
        os.chdir(before[1])
        pytest.fail(f"{request.node.nodeid} changed the process's (locale, working folder) {before} to {after}")


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


MONAILABEL_TINY = {"patch_size": [64, 64, 32], "base_features": 4, "num_workers": 0, "sw_batch_size": 4}
MONAILABEL_TINY_TRAIN = {**MONAILABEL_TINY, "iterations_per_epoch": 2, "val_interval": 1, "cache_rate": 0.0}


def monailabel_bundle(name: str, registry, root: Path, **settings) -> Path:
    """A copy of bundle ``name`` as a user would keep it for MONAI Label: small settings (``settings`` replacing
    some) written into its inference.json / train.json, and a model (random weights) of ``registry``'s tasks with its
    tasks.json in models/."""
    from monai.bundle import ConfigParser

    from uniseg_monai.model_io.model_files import save_model
    from uniseg_monai.tasks import save_model_tasks

    bundle = root / name
    shutil.copytree(BUNDLES / name, bundle, ignore=shutil.ignore_patterns("models"))
    for config, values in (("inference", MONAILABEL_TINY), ("train", MONAILABEL_TINY_TRAIN)):
        path = bundle / "configs" / f"{config}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **values, **settings}, indent=1))
    save_model_tasks(registry, bundle / "models")
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    save_model(bundle / "models" / "model.pt", network.state_dict(), network.network_def(), registry)
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


def free_port() -> int:
    """A TCP port free on this machine now, for a torchrun master: a fixed one fails when two test runs share the
    machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PREDICT_BUNDLE = BUNDLES / "uniseg_pretrain"
PREDICT_TINY = {"patch_size": [64, 64, 32], "base_features": 4}  # the settings predict_model is trained with


@pytest.fixture(scope="session")
@integration
def predict_model(phantoms, tmp_path_factory) -> Path:
    """Checkpoint of a tiny model (:data:`PREDICT_TINY`) trained through the pretrain bundle for one epoch of 2
    iterations on the 4 phantom tasks, validated (which saves ``model.pt``) on one PET/CT case only, to save time;
    trained once per session for every ``uniseg predict`` test."""
    from uniseg_monai.apps.bundles import run_workflow

    root = tmp_path_factory.mktemp("predict_model")
    datalist = json.loads(phantoms.read_text())
    datalist["validation"] = [i for i in datalist["validation"] if i["task"] == "ph_petct"][:1]
    for item in datalist["training"] + datalist["validation"]:
        for key in ("image", "label"):
            item[key] = [str(phantoms.parent / f) for f in item[key]] if isinstance(item[key], list) else (
                str(phantoms.parent / item[key]))  # fmt: skip
    (root / "datalist.json").write_text(json.dumps(datalist))
    run_workflow(
        PREDICT_BUNDLE,
        "train",
        ["train"],
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
    return root / "models" / "model.pt"
