"""Shared test helpers: the ../shared folder (fixtures, real samples) beside the project."""

from __future__ import annotations

import json
import os
import shutil
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
    """The tests' tiny networks run faster on one thread than on two cores shared with data loading."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
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
    from uniseg_monai.official import infer_network_def

    bundle = shutil.copytree(BUNDLES / name, root / name)
    network_def = infer_network_def(official_fixture[f"{kind}_state_dict"])
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    for key in ("features", "kernel_sizes", "strides"):
        config[key] = network_def[key]
    config["patch_size"] = network_def.get("patch_size", config["patch_size"])
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    return bundle
