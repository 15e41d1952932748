"""The project's user errors: what the ``uniseg`` command prints as one line (exit status 2) instead of a traceback.

Raise a :class:`UniSegError` subclass for anything the user can fix (a file, a datalist, an option); every other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UniSegError(Exception):
    """Something the user gave cannot be used; the message names it and says what to do."""


class UsageError(UniSegError, ValueError):
    """A command-line option or bundle setting that is missing, unknown or out of range."""


class InputError(UniSegError, ValueError):
    """An input image, folder or case that cannot be segmented."""
