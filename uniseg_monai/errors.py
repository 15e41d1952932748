"""The project's user errors: what the ``uniseg`` command prints as one line (exit status 2) instead of a traceback;
and :func:`flag`, the strict reading of a boolean the user typed.

Raise a :class:`UniSegError` subclass for anything the user can fix (a file, a datalist, an option); every other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Any


class UniSegError(Exception):
    """Something the user gave cannot be used; the message names it and says what to do."""


class UsageError(UniSegError, ValueError):
    """A command-line option or bundle setting that is missing, unknown or out of range."""


class InputError(UniSegError, ValueError):
    """An input image, folder or case that cannot be segmented."""


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
