"""The fine-tuning bundles, generated from one template and their task facts.

``bundles/templates/finetune/`` holds the files every fine-tuning bundle has, with ``{{key}}`` placeholders;
``bundles/templates/finetune_bundles.json`` is the table of bundles: each one's task (a built-in task of
:mod:`uniseg_monai.tasks`), the template files it leaves out and its texts (a list of strings is a block of lines).
A key is a task fact (:func:`task_values`), ``name`` (the bundle's folder name) or one of the bundle's texts.

In a ``.json`` template a placeholder that is a whole JSON string (``"{{key}}"``) becomes the value as JSON (a
number, a list, an object); one inside a string becomes the text, JSON-escaped. In other files it becomes the
text. ``models/tasks.json`` is the task's table, as training writes it. ``uniseg finetune-bundles`` writes the
bundles (only the files that change), ``--check`` lists the files that differ from what it would write.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from uniseg_monai.core.atomic import Writer, write_group
from uniseg_monai.core.errors import UsageError
from uniseg_monai.core.json_files import read_json
from uniseg_monai.tasks import MODEL_TASKS_FILE, PAPER_DICE, Task, TaskRegistry

TEMPLATE = Path("templates") / "finetune"  # in the bundles folder
TABLE = Path("templates") / "finetune_bundles.json"
OWNED = ("configs", "docs")  # folders of a bundle whose every file comes from the template
PLACEHOLDER = re.compile(r'(")?\{\{([A-Za-z0-9_]+)\}\}(")?')


def default_root() -> Path:
    """The bundles folder: ``./bundles``, else the one of the source tree this package is installed from."""
    local = Path("bundles")
    return local if (local / TABLE).is_file() else Path(__file__).resolve().parents[1] / "bundles"


def _modality(task: Task) -> str:
    """The metadata ``modality`` of a task (as :mod:`uniseg_monai.metadata`, which a test compares): CT, PET/CT,
    PET or MR (any other sequence)."""
    names = {m.upper() for m in task.modalities}
    return "PET/CT" if names == {"CT", "PET"} else "CT" if names == {"CT"} else "PET" if names == {"PET"} else "MR"


def task_values(task: Task) -> dict[str, Any]:
    """The placeholders a task fills: ``task``, ``normalization`` (JSON list), ``spacing`` (``1.5x1.5x3``),
    ``num_classes``, ``in_channels``, ``modality``, ``modality_channels`` / ``label_channels`` (metadata
    ``channel_def`` of the image and the prediction), ``columns`` (table columns: ``Sp | RKi | ...``) and
    ``paper_dice`` (the paper's Dice as a fraction, for built-in tasks the paper reports)."""
    values: dict[str, Any] = {
        "task": task.name,
        "normalization": [n.to_json() for n in task.normalization],
        "spacing": "x".join(f"{s:g}" for s in task.spacing),
        "num_classes": task.num_classes,
        "in_channels": task.in_channels,
        "modality": _modality(task),
        "modality_channels": {str(k): m for k, m in enumerate(task.modalities)},
        "label_channels": {"0": "background", **{str(k): task.labels[k] for k in range(1, task.num_classes)}},
        "columns": " | ".join(task.column_names[1:]),
    }
    if task.name in PAPER_DICE:
        values["paper_dice"] = round(PAPER_DICE[task.name] / 100, 6)
    return values


def _as_json(value: Any, indent: str) -> str:
    """``value`` as JSON at a line indented by ``indent``: scalars and lists of scalars on one line, objects and
    nested lists over lines of 4-space indent (the bundle files' layout)."""
    if not isinstance(value, (dict, list)) or (isinstance(value, list) and all(not isinstance(v, (dict, list))
                                                                               for v in value)):  # fmt: skip
        return json.dumps(value)
    return json.dumps(value, indent=4).replace("\n", "\n" + indent)


def fill(template: str, values: dict[str, Any], json_file: bool, where: str) -> str:
    """``template`` with its placeholders replaced by ``values`` (see the module docstring); ``where`` names the
    template file in the error for a key with no value."""

    def replace(match: re.Match) -> str:
        key = match[2]
        if key not in values:
            raise UsageError(
                f'{where}: no value for {{{{{key}}}}}; add {key!r} to the bundle\'s "text" in {TABLE} (task facts: '
                f"{', '.join(sorted(values))})"
            )
        value = values[key]
        if json_file and match[1] and match[3]:
            line = template[template.rfind("\n", 0, match.start()) + 1 : match.start()]
            return _as_json(value, line[: len(line) - len(line.lstrip())])
        text = value if isinstance(value, str) else json.dumps(value)
        return (match[1] or "") + (json.dumps(text)[1:-1] if json_file else text) + (match[3] or "")

    return PLACEHOLDER.sub(replace, template)


def read_table(root: Path) -> dict[str, dict[str, Any]]:
    """The table of fine-tuning bundles (``TABLE`` in the bundles folder ``root``): name -> ``task`` (a built-in
    task), ``leave_out`` (template files it lacks), ``text`` (key -> string or list of lines)."""
    path = root / TABLE
    try:
        table = read_json(path)
    except FileNotFoundError:
        raise UsageError(f"{path} not found: pass the bundles folder that holds {TABLE}") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: not valid JSON ({err}); fix the file") from None
    if not isinstance(table, dict) or not all(isinstance(e, dict) for e in table.values()):
        raise UsageError(f'{path}: must map bundle names to objects with "task", "leave_out" and "text"')
    tasks = TaskRegistry()
    for name, entry in table.items():
        if entry.get("task") not in tasks:
            raise UsageError(
                f"{path}: bundle {name!r} has task {entry.get('task')!r}; use a built-in one: {tasks.names}"
            )
        missing = [p for p in entry.get("leave_out", []) if not (root / TEMPLATE / p).is_file()]
        clash = sorted(set(entry.get("text", {})) & {"name", *task_values(tasks[entry["task"]])})
        if missing or clash:
            raise UsageError(
                f"{path}: bundle {name!r}: "
                + (f"leave_out {missing} not in {root / TEMPLATE}" if missing else f"text keys {clash} are task facts")
            )
    return table


def bundle_files(root: Path, name: str, entry: dict[str, Any]) -> dict[Path, str]:
    """The files of the fine-tuning bundle ``name`` (relative to its folder) -> their text: the template filled
    with its task's facts and its texts, and ``models/tasks.json``."""
    task = TaskRegistry()[entry["task"]]
    texts = {k: "\n".join(v) if isinstance(v, list) else v for k, v in entry.get("text", {}).items()}
    values = {**texts, **task_values(task), "name": name}
    template = root / TEMPLATE
    leave_out = {Path(p) for p in entry.get("leave_out", [])}
    files = {}
    for path in sorted(p for p in template.rglob("*") if p.is_file()):
        relative = path.relative_to(template)
        if relative not in leave_out and not any(part.startswith(".") for part in relative.parts):
            files[relative] = fill(path.read_text(), values, path.suffix == ".json", str(path))
    files[Path("models") / MODEL_TASKS_FILE] = json.dumps({"tasks": TaskRegistry([task]).to_json()}, indent=2) + "\n"
    return files


def generate(root: Path) -> dict[Path, str]:
    """Every file of every fine-tuning bundle in the bundles folder ``root`` (paths under ``root``) -> its text."""
    return {
        root / name / relative: text
        for name, entry in read_table(root).items()
        for relative, text in bundle_files(root, name, entry).items()
    }


def differences(root: Path) -> list[str]:
    """One line per file of the fine-tuning bundles that is not what :func:`generate` makes: differing, missing,
    or in a bundle's ``configs/`` or ``docs/`` without coming from the template."""
    files = generate(root)
    lines = []
    for path, text in files.items():
        if not path.is_file():
            lines.append(f"{path}: missing")
        elif path.read_bytes() != text.encode():
            lines.append(f"{path}: differs from the template")
    for name in read_table(root):
        for folder in OWNED:
            for path in sorted((root / name / folder).rglob("*")):
                if path.is_file() and path not in files and "__pycache__" not in path.parts:
                    lines.append(f"{path}: not made by the template (remove it, or add it to {root / TEMPLATE})")
    return lines


def _writer(data: bytes) -> Writer:
    """A :func:`~uniseg_monai.atomic.write_group` writer of ``data``."""
    return lambda f: f.write(data)


def write_bundles(root: Path) -> list[Path]:
    """Write the files of the fine-tuning bundles that differ from what :func:`generate` makes, all together
    (:func:`~uniseg_monai.atomic.write_group`); returns them."""
    wanted = {path: text.encode() for path, text in generate(root).items()}
    changed = {path: data for path, data in wanted.items() if not path.is_file() or path.read_bytes() != data}
    write_group({path: _writer(data) for path, data in changed.items()})
    return list(changed)
