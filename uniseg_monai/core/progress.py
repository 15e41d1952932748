"""The package's progress bars: on a terminal only, so logs and pipes get no carriage-return fragments."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tqdm import tqdm


def progress_bar(iterable: Iterable[Any] | None = None, *, show: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr, drawn only where stderr (or ``file``) is a terminal (tqdm's ``disable=None``) and
    ``show`` is true; otherwise it only iterates. The bundles' ignite ``ProgressBar`` takes ``"disable": null``."""
    return tqdm(iterable, disable=None if show else True, **kwargs)
