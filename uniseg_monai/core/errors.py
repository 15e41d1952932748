"""The project's user errors: what the ``uniseg`` command and the bundles print as one line instead of a traceback;
and :func:`flag`, the strict reading of a boolean the user typed.

Raise a :class:`UniSegError` subclass for anything the user can fix (a file, a datalist, an option); every other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any


class UniSegError(Exception):
    """Something the user gave cannot be used; the message names it and says what to do."""


class UsageError(UniSegError, ValueError):
    """A command-line option or bundle setting that is missing, unknown or out of range."""


class InputError(UniSegError, ValueError):
    """An input image, folder or case that cannot be segmented."""


class NonFiniteError(UniSegError, FloatingPointError):
    """Training met NaN / Inf numbers (inputs, loss or gradients); the message names the batch and what to do."""


USER_ERRORS = (
    UniSegError,
    OSError,
)  # OSError: missing / unreadable / read-only / full disk; the message names the path
DEBUG_ENV = "UNISEG_DEBUG"  # set to 1 to get the full traceback of a user error

TRUE, FALSE = ("true", "yes", "1"), ("false", "no", "0")


def flag(value: Any, name: str) -> bool:
    """A boolean id or option as given on a command line: ``monai.bundle run --resume false`` passes the string
    'false' (fire turns only ``False`` into a bool), which would count as true; true/false/yes/no/1/0 in any case."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in TRUE + FALSE:
        raise UsageError(f"--{name} takes true or false, got {value!r}")
    return text in TRUE


def user_error(err: BaseException | None) -> BaseException | None:
    """The user error behind ``err`` (MONAI wraps errors raised while a config item is built in RuntimeErrors), if
    any: the first :data:`USER_ERRORS` instance along its causes."""
    seen = set()
    while err is not None and not isinstance(err, USER_ERRORS) and id(err) not in seen:
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return err if isinstance(err, USER_ERRORS) else None


def one_line(err: BaseException) -> str:
    """``err``'s message on one line; a DataLoader worker's copy (which carries the worker's traceback text) gives
    its last line, the original message."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split()) or type(err).__name__


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in TRUE


IGNITE_STOP = "Engine run is terminating due to exception"


def _one_line_record(factory: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    """A log-record factory whose records lose the traceback of a user error (ignite and MONAI's handlers log an
    engine's exception with it) and carry its one-line message instead; at ERROR level (and ignite's "Engine run is
    terminating" line) they become DEBUG records: the run ends with that message once (:func:`_excepthook`)."""

    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        if record.exc_info:
            cause = user_error(record.exc_info[1])
        else:  # ignite logs the exception it is handling by its text alone
            cause = user_error(sys.exc_info()[1]) if str(record.msg).startswith(IGNITE_STOP) else None
        if cause is not None and not debugging():
            record.msg, record.args = f"stopped: {one_line(cause)}", ()
            record.exc_info, record.exc_text = None, None
            if record.levelno >= logging.ERROR:
                record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return record

    make.one_line = True  # type: ignore[attr-defined]
    return make


def _excepthook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    cause = user_error(value)
    if cause is None or debugging():
        sys.__excepthook__(kind, value, tb)
        return
    print(f"uniseg: error: {one_line(cause)}\n(for the traceback run again with {DEBUG_ENV}=1)", file=sys.stderr)


def one_line_errors() -> bool:
    """Make a bundle run (``python -m monai.bundle run``) end a user error with its message on one line of stderr
    instead of MONAI's chained traceback ending in "Failed to instantiate component": installs a ``sys.excepthook``
    and a log-record factory that drops a user error's traceback from log records. ``UNISEG_DEBUG=1`` restores the
    tracebacks. True, for ``initialize``."""
    sys.excepthook = _excepthook
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "one_line", False):
        logging.setLogRecordFactory(_one_line_record(factory))
    return True
