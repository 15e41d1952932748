"""Reading a JSON file the user gave (a datalist, a task table, a bundle's metadata, a run's summary)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: str | Path) -> Any:
    """The JSON value in ``path``; bytes that are not UTF-8 text (a binary file, a Latin-1 export) raise a
    :class:`json.JSONDecodeError` like malformed JSON does, so one ``except`` gives either a one-line message.
    :class:`FileNotFoundError` passes."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise json.JSONDecodeError(
            f"not UTF-8 text (byte {data[err.start]:#04x})", repr(data[:80]), err.start
        ) from None
    return json.loads(text)
