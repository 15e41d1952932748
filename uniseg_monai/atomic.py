"""Atomic file writes: a temporary file beside the destination, then a rename — never a half-written file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(dst: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(f)`` on a binary file beside ``dst`` and rename it to ``dst`` (keeping the mode of the file it
    replaces, else the umask's); on failure ``dst`` is untouched."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        mode = dst.stat().st_mode & 0o7777 if dst.exists() else 0o666 & ~umask  # a replaced file keeps its mode
        os.chmod(tmp, mode)  # mkstemp makes 0600
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(dst: str | os.PathLike, text: str) -> None:
    """:func:`write_atomic` of UTF-8 text."""
    write_atomic(dst, lambda f: f.write(text.encode()))
