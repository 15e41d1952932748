"""Shared test helpers: the ../shared folder (fixtures, real samples) beside the project."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"


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
