"""Atomic file writes: a temporary file beside the destination, then a rename — never a half-written file;
:func:`write_group`: several files that appear together or not at all; and :func:`inside`: the path of an output
file named after a task or case, refused unless it lies in its output folder."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path, PurePath
from typing import BinaryIO

from uniseg_monai.core.errors import InputError

Writer = Callable[[BinaryIO], object]
PARTIAL = ".uniseg-partial"  # the marker of this module's temporaries: only names ending so are ever removed
TEMPORARY = re.compile(rf"^\.(?P<name>.+)\.[a-z0-9_]{{8}}{re.escape(PARTIAL)}$")  # mkstemp beside <name>


def is_file_name(name: object) -> bool:
    """Whether ``name`` is one file name: a non-empty string without a folder part, not ``.`` or ``..``."""
    return isinstance(name, str) and PurePath(name).name == name and name not in ("", "..")


def inside(folder: str | os.PathLike, name: str) -> Path:
    """``folder / name`` for an output file (or folder) whose ``name`` is built from task or case names; an
    :class:`~uniseg_monai.core.errors.InputError` unless ``name`` is one file name (no folder part, not ``.`` or ``..``)
    and the path, links resolved, lies in ``folder`` (a link there pointing elsewhere is refused too)."""
    path = Path(folder) / name
    if not is_file_name(name) or not path.resolve().is_relative_to(Path(folder).resolve()):
        raise InputError(
            f"{path}: not a file in the output folder {folder} ({name!r} has a folder part or '..', or a link leads "
            "out): rename the task or case, or remove the link"
        )
    return path


def current_umask() -> int:
    """The process's umask, read from /proc/self/status where it can be (Linux); elsewhere set and restored, which
    briefly changes it for every thread."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def temporaries(folder: str | os.PathLike) -> dict[Path, str]:
    """The temporary files of writes here in ``folder`` (``.<name>.XXXXXXXX.uniseg-partial``) -> the ``<name>`` each
    was for; one left while no write runs in the folder is the orphan of an interrupted one. A user's own hidden
    file (``.<name>.original``) lacks the marker and is never taken for one."""
    found = {}
    for path in Path(folder).iterdir():
        match = TEMPORARY.match(path.name)
        if match and path.is_file():
            found[path] = match["name"]
    return found


def _temporary(dst: Path, write: Writer) -> Path:
    """``write(f)`` into a new temporary file beside ``dst``, given the mode a plain ``open(dst, "w")`` would
    leave: a replaced file's own mode, else 0o666 less the umask (mkstemp makes 0o600); removed on failure."""
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=PARTIAL)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        mode = dst.stat().st_mode & 0o7777 if dst.exists() else 0o666 & ~current_umask()
        os.chmod(tmp, mode)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def write_atomic(dst: str | os.PathLike, write: Writer) -> None:
    """Call ``write(f)`` on a binary file beside ``dst`` and rename it to ``dst`` (keeping the mode of the file it
    replaces, else the umask's, as ``open()`` would); on failure ``dst`` is untouched."""
    write_group({dst: write})


def write_text_atomic(dst: str | os.PathLike, text: str) -> None:
    """:func:`write_atomic` of UTF-8 text."""
    write_atomic(dst, lambda f: f.write(text.encode()))


def write_group(files: Mapping[str | os.PathLike, Writer]) -> None:
    """Write several files so that they appear together or not at all: each ``write(f)`` goes to a temporary file
    beside its destination (modes as :func:`write_atomic`), and only when every one is written are they renamed.

    On a failure the temporaries are removed and no destination is touched. A rename itself failing (rare: the
    destination became a folder, the disk went away) removes the group's files renamed so far that did not exist
    before, so none of the group is left new; files they replaced are gone, as with any overwrite.
    """
    targets = [Path(p) for p in files]
    for dst in targets:
        dst.parent.mkdir(parents=True, exist_ok=True)
    temporaries: list[Path] = []
    try:
        for dst, write in zip(targets, files.values()):
            temporaries.append(_temporary(dst, write))
    except BaseException:
        for tmp in temporaries:
            tmp.unlink(missing_ok=True)
        raise
    existed = [dst.exists() for dst in targets]
    renamed = 0
    try:
        for tmp, dst in zip(temporaries, targets):
            os.replace(tmp, dst)
            renamed += 1
    except BaseException:
        for dst, was in zip(targets[:renamed], existed):
            if not was:
                dst.unlink(missing_ok=True)
        for tmp in temporaries[renamed:]:
            tmp.unlink(missing_ok=True)
        raise
