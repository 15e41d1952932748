"""The module paths before the layers became sub-packages (0.4), kept importable for users' config overlays and code.

``uniseg_monai.transforms.InvertArgmaxd`` (a ``_target_``, a ``$`` expression or an import) resolves to the object
now at ``uniseg_monai.data.transforms.InvertArgmaxd``, with a ``DeprecationWarning`` naming that new path. An old
module is a stand-in that looks each name up in its new module(s): a module split in two (``model_files``,
``handlers``: their training-checkpoint part is now :mod:`uniseg_monai.engine.checkpoints`) looks in both. A name
that never existed fails as before (``ModuleNotFoundError`` / ``AttributeError``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

PACKAGE = "uniseg_monai"
# old module (under uniseg_monai) -> its new module(s), looked up in this order
MOVED: dict[str, tuple[str, ...]] = {
    **{name: (f"core.{name}",) for name in ("errors", "atomic", "run_folder", "locks")},
    **{name: (f"model_io.{name}",) for name in ("official", "transfer")},
    "model_files": ("model_io.model_files", "engine.checkpoints"),
    **{name: (f"data.{name}",) for name in ("transforms", "memory")},
    **{name: (f"engine.{name}",) for name in ("losses", "inferers", "batches", "guards", "precision")},
    **{name: (f"engine.{name}",) for name in ("random_states", "evaluation", "wiring")},
    "handlers": ("engine.handlers", "engine.checkpoints"),
    **{name: (f"apps.{name}",) for name in ("predict", "add_task", "export", "report", "demo", "ablation")},
    **{name: (f"apps.{name}",) for name in ("metadata", "bundles", "weights")},
}


def new_place(old: str, name: str) -> tuple[str, Any]:
    """The new module of ``name`` from the old module ``old`` (e.g. ``transforms``) and the object itself; an
    ``AttributeError`` as for any module when none of its new modules has it."""
    for target in MOVED[old]:
        module = importlib.import_module(f"{PACKAGE}.{target}")
        if name in vars(module):
            return module.__name__, vars(module)[name]
    raise AttributeError(f"module '{PACKAGE}.{old}' has no attribute '{name}'")


def stand_in(old: str) -> types.ModuleType:
    """A module ``uniseg_monai.<old>`` whose attributes are those of its new module(s), each with a warning."""
    module = types.ModuleType(f"{PACKAGE}.{old}", f"Moved: see {', '.join(f'{PACKAGE}.{t}' for t in MOVED[old])}.")

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):  # the import system's and tools' probes (__path__, __file__, ...): not moved names
            raise AttributeError(f"module '{PACKAGE}.{old}' has no attribute '{name}'")
        where, value = new_place(old, name)
        warnings.warn(
            f"{PACKAGE}.{old}.{name} moved to {where}.{name}; the old path still resolves",
            DeprecationWarning,
            stacklevel=2,
        )
        return value

    def __dir__() -> list[str]:
        return sorted({n for t in MOVED[old] for n in vars(importlib.import_module(f"{PACKAGE}.{t}"))})

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    module.__dir__ = __dir__  # type: ignore[method-assign]
    return module


class MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old module names of :data:`MOVED` (and nothing else) as their :func:`stand_in`."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        package, _, old = fullname.partition(".")
        if package != PACKAGE or old not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return stand_in(spec.name.partition(".")[2])

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the stand-in resolves its names when they are used."""


def install() -> None:
    """Put :class:`MovedFinder` first on ``sys.meta_path``, once (the package's ``__init__`` calls it): before the
    finders of files, so that a stale ``uniseg_monai/transforms.py`` (e.g. of another checkout on the path) does not
    shadow the new module."""
    if not any(isinstance(finder, MovedFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedFinder())


def package_attribute(name: str) -> types.ModuleType:
    """``uniseg_monai.<name>`` for an old module name used as an attribute (a ``$uniseg_monai.transforms.X``
    expression after ``import uniseg_monai``)."""
    if name not in MOVED:
        raise AttributeError(f"module '{PACKAGE}' has no attribute '{name}'")
    return importlib.import_module(f"{PACKAGE}.{name}")
