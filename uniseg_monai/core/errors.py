"""The project's user errors: what the ``uniseg`` command and the bundles print as one line instead of a traceback;
and :func:`flag`, the strict reading of a boolean the user typed.

Raise a :class:`UniSegError` subclass for anything the user can fix (a file, a datalist, an option); every other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import ast
import difflib
import json
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


def raised_in(err: BaseException, packages: tuple[str, ...]) -> bool:
    """Whether ``err`` was raised inside one of the ``packages`` (a frame of its traceback is in their modules): a
    library rejecting a value it was given, rather than a bug in the caller's own code."""
    tb = err.__traceback__
    while tb is not None:
        if str(tb.tb_frame.f_globals.get("__name__", "")).split(".")[0] in packages:
            return True
        tb = tb.tb_next
    return False


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
    tracebacks. Then refuses an id on the command line that no config of the bundle defines
    (:func:`check_command_line_ids`). True, for ``initialize``."""
    sys.excepthook = _excepthook
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "one_line", False):
        logging.setLogRecordFactory(_one_line_record(factory))
    check_command_line_ids()
    return True


# MONAI's own arguments of ``python -m monai.bundle run`` (monai.bundle.scripts.run and ConfigWorkflow)
MONAI_RUN_ARGS = frozenset(
    "run_id init_id final_id meta_file config_file logging_file tracking args_file workflow_name workflow_type "
    "properties_path bundle_root".split()
)


def _ids(value: Any, prefix: str, into: set[str]) -> None:
    """Every id of a config value (``a#b#0`` style), added to ``into``."""
    if prefix:
        into.add(prefix)
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, sub in items:
        _ids(sub, f"{prefix}#{key}" if prefix else str(key), into)


def _defined_ids(config_files: list[str]) -> set[str]:
    """The ids the JSON configs in the folders of ``config_files`` (and below) define."""
    ids: set[str] = set()
    for folder in {os.path.dirname(os.path.abspath(f)) for f in config_files}:
        for root, _, names in os.walk(folder):
            for name in (n for n in names if n.endswith(".json")):
                try:
                    with open(os.path.join(root, name)) as f:
                        _ids(json.load(f), "", ids)
                except (OSError, ValueError):
                    continue
    return ids


def _argv_ids(argv: list[str]) -> dict[str, str]:
    """``{id: value}`` of the ``--id value`` / ``--id=value`` / ``--flag`` arguments of a fire command line."""
    found: dict[str, str] = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--") and len(arg) > 2:
            key, eq, value = arg[2:].partition("=")
            nxt = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else ""
            found[key.replace("-", "_")] = value if eq else nxt
    return found


def _config_files(value: str) -> list[str]:
    """The files of a ``--config_file`` value: a path, a Python/JSON list of paths or comma-separated paths."""
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    if isinstance(parsed, str):
        return [parsed] if os.path.isfile(parsed) or "," not in parsed else parsed.split(",")
    return [str(p) for p in parsed] if isinstance(parsed, list | tuple) else []


def check_command_line_ids(argv: list[str] | None = None) -> bool:
    """In ``python -m monai.bundle run`` (``argv``: default ``sys.argv`` there, else nothing is checked): a
    :class:`UsageError` for an ``--id`` that no JSON config beside the ``--config_file`` files defines and that is
    not MONAI's own argument (:data:`MONAI_RUN_ARGS`), naming the closest known id: MONAI would add a typo such as
    ``--epoch 5`` as a new id that nothing reads. True."""
    if argv is None:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if spec is None or not spec.name.startswith("monai.bundle") or sys.argv[1:2] != ["run"]:
            return True
        argv = sys.argv[2:]
    given = _argv_ids(argv)
    files = _config_files(given.get("config_file", ""))
    if not files:
        return True
    ids = _defined_ids(files)
    for key in given:
        if key in MONAI_RUN_ARGS or key in ids or key.startswith("_meta_"):
            continue
        parent = key.rpartition("#")[0]
        if parent and parent in ids and f"{parent}#_target_" in ids:
            continue  # another keyword argument of a component
        close = difflib.get_close_matches(key, sorted(ids | MONAI_RUN_ARGS), n=1)
        hint = f"did you mean --{close[0]}?" if close else "check its spelling against the bundle's configs"
        raise UsageError(f"--{key}: no config of the bundle defines this id, so it would do nothing; {hint}")
    return True
