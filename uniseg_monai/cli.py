"""The ``uniseg`` command line (``python -m uniseg_monai <command>``), built with fire."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import fire

from uniseg_monai.official import OfficialCheckpointError, convert_official


def _convert_official(src: str, dst: str, overwrite: bool = False) -> None:
    """Convert an official UniSeg checkpoint (.model, upstream or downstream) to this package's format.

    Args:
        src: official checkpoint: a dict with ``state_dict`` (nnU-Net v1 keys, (z, y, x) axes).
        dst: output ``.pt``: {"model": state dict, "network_def": MONAI bundle config of the network}.
        overwrite: replace ``dst`` if it exists (otherwise an existing file is never touched).
    """
    report = convert_official(src, dst, overwrite=overwrite)
    print(json.dumps(report, indent=2))


COMMANDS: dict[str, Callable[..., Any]] = {
    "convert-official": _convert_official,
}

USER_ERRORS = (OfficialCheckpointError, FileExistsError, FileNotFoundError, ValueError)


def main(argv: list[str] | None = None) -> None:
    """Run one ``uniseg`` command; user errors print one line and exit with status 2."""
    try:
        fire.Fire(COMMANDS, command=argv, name="uniseg")
    except USER_ERRORS as err:
        print(f"uniseg: error: {err}", file=sys.stderr)
        sys.exit(2)
