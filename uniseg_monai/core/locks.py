"""One run at a time per folder: a run folder (``ckpt_dir``) or an output folder is owned by the process holding
``<folder>/.uniseg.lock``, created atomically with its pid, host, start time and command, and released when the run
ends or the process exits. A lock whose process is gone (same host) is stale and taken over with a warning; a live
owner's folder is refused in one line (:class:`FolderInUseError`)."""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from uniseg_monai.core.errors import InputError, UniSegError, UsageError

LOCK_NAME = ".uniseg.lock"
logger = logging.getLogger(__name__)


class FolderInUseError(UniSegError):
    """Another live run owns the folder; the message names it, the owner's pid and what to do."""


@dataclass
class _Held:
    path: Path
    token: str
    pid: int  # a forked child inherits the table, never the lock
    created: list[Path]  # folders made for the lock, deepest first: removed on release while empty


_held: dict[Path, _Held] = {}


def _ours(folder: str | os.PathLike) -> _Held | None:
    """This process's lock of ``folder``, if it holds one."""
    held = _held.get(Path(folder).absolute().resolve())
    return held if held is not None and held.pid == os.getpid() else None


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (field 22 of /proc/PID/stat, clock ticks since boot); None where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(owner: dict[str, Any]) -> bool:
    """Whether a lock's owner may still run: always when on another host (its processes cannot be seen); on this
    host while its pid exists and, where /proc tells, started when the lock says (not a reused pid). This process's
    own pid is not alive here: a lock it holds is found in the table first."""
    if owner.get("host") != socket.gethostname():
        return True
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    start = _process_start(pid)
    return owner.get("pid_start") is None or start is None or start == owner["pid_start"]


def _read(path: Path) -> tuple[str | None, dict[str, Any] | None]:
    """A lock file's text and owner; the owner is None while the file is being written (retried for a second) or
    when it is unreadable; both are None when the file is gone."""
    text = None
    for _ in range(10):
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None, None
        try:
            owner = json.loads(text)
            if isinstance(owner, dict):
                return text, owner
        except ValueError:
            pass
        time.sleep(0.1)
    return text, None


def _take_away(path: Path, seen: str) -> None:
    """Remove a stale lock whose text is ``seen``, unless another process replaced it meanwhile (then it is put
    back)."""
    aside = path.with_name(f"{LOCK_NAME}.{os.getpid()}.stale")
    try:
        os.replace(path, aside)
    except FileNotFoundError:  # another process took it away first
        return
    if aside.read_text() != seen:
        os.replace(aside, path)
    else:
        aside.unlink()


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the folders created, deepest first."""
    missing, parent = [], folder.absolute()
    while not parent.is_dir() and parent != parent.parent:
        if parent.exists() or parent.is_symlink():
            raise UsageError(
                f"{folder} cannot be the run's folder: {parent} is a file, not a folder; choose another folder "
                "(nothing was written)"
            )
        missing.append(parent)
        parent = parent.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def acquire(folder: str | os.PathLike, what: str) -> bool:
    """Own ``folder`` (created if needed) for ``what`` (e.g. ``training``) until :func:`release` or the end of the
    process; again in the process that owns it: nothing changes. A stale lock (its process gone) is taken over with a
    warning; a live owner raises :class:`FolderInUseError`. True, for a bundle's ``initialize`` or ``run`` list."""
    if _ours(folder):
        return True
    folder = Path(folder)
    path = folder / LOCK_NAME
    if path.is_dir() or (path.exists() and not path.is_file()):
        raise InputError(
            f"{path} is not a file (a folder or special file where the lock goes): remove it and run again"
        )
    created = _make_folder(folder)
    token = uuid.uuid4().hex
    me = {"pid": os.getpid(), "host": socket.gethostname(), "pid_start": _process_start(os.getpid()),
          "started": datetime.now(UTC).isoformat(timespec="seconds"), "what": what,
          "command": " ".join(sys.argv), "token": token}  # fmt: skip
    for _ in range(5):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            text, owner = _read(path)
            if owner is not None and _alive(owner):
                command = textwrap.shorten(str(owner.get("command", "")), 120, placeholder=" ...")  # whole words
                raise FolderInUseError(
                    f"{folder} is in use by another {owner.get('what', 'run')}: pid {owner.get('pid')} on "
                    f"{owner.get('host')} since {owner.get('started')} ({command}); wait for it "
                    f"to end or choose another folder (if that process is gone, delete {path})"
                ) from None
            if text is not None:
                gone = f"pid {owner.get('pid')} on {owner.get('host')}" if owner else "unreadable"
                logger.warning("%s: taking over the stale lock of a run that is gone (%s)", folder, gone)
                _take_away(path, text)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me) + "\n")
        _held[folder.absolute().resolve()] = _Held(path, token, os.getpid(), created)
        return True
    raise FolderInUseError(f"{folder}: could not take {path} (other runs keep replacing it); try again")


def release(folder: str | os.PathLike) -> bool:
    """Give up ``folder`` if this process owns it: its lock file is removed, and the folders :func:`acquire` made
    while they are empty. True, for a bundle's ``run`` list."""
    held = _ours(folder)
    if held is None:
        return True
    del _held[Path(folder).absolute().resolve()]
    try:
        if json.loads(held.path.read_text()).get("token") == held.token:
            held.path.unlink()
    except (OSError, ValueError):
        pass
    for made in held.created:
        try:
            made.rmdir()
        except OSError:
            break
    return True


@contextmanager
def owned(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """``folder`` owned (:func:`acquire`) for the block, released when it ends, also on an exception or Ctrl-C (unless
    this process owned it before)."""
    if _ours(folder):
        yield Path(folder)
        return
    acquire(folder, what)
    try:
        yield Path(folder)
    finally:
        release(folder)


@contextmanager
def claimed(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """``folder`` owned (:func:`acquire`) from the block on: released if the block raises (a refused run gives it
    up), else kept until :func:`release` or the end of the process (a bundle run's checks, then the run)."""
    acquire(folder, what)
    try:
        yield Path(folder)
    except BaseException:
        release(folder)
        raise


@atexit.register
def _release_all() -> None:
    """A process that ends (normally, by an exception or Ctrl-C) gives its folders up."""
    for key in list(_held):
        release(key)
