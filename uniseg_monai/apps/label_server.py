"""``uniseg label-server``: MONAI Label's server (``monailabel start_server``, 0.8.5) on the UniSeg app
(:mod:`uniseg_monai.apps.label_app`), offline on a CPU (README: "MONAI Label / 3D Slicer").

MONAI Label imports two packages at server start that this package's environment cannot import: ``torchvision``
(``make_grid`` / ``save_image`` for 2D pathology; PyPI has no CPU build for the CPU torch) and ``pydicom_seg``
(MONAI Label's own DICOM SEG writer and reader; it fails under pydicom 3, MONAI Label issue #1841). Where they do not
import, :func:`monailabel_imports` registers stand-ins whose every use raises one line saying why; the UniSeg app
never uses them (it writes DICOM SEG with :func:`uniseg_monai.data.dicom_seg.build_seg`).
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from typing import Any

from uniseg_monai.apps.bundles import DEFAULT_BUNDLE
from uniseg_monai.core.errors import UsageError

# MONAI Label settings (environment variables read when monailabel.config is imported) that keep the server offline
# and quiet: no MLflow tracking of training runs. The app itself looks nothing up (no model zoo, no SAM2 download,
# no dcmqi download; see label_app), so no other switch is needed.
OFFLINE_SETTINGS = {"MONAI_LABEL_TRACKING_ENABLED": "false"}
APP_MAIN = '''"""MONAI Label app folder written by `uniseg label-server`: the app is uniseg_monai.apps.label_app."""

from uniseg_monai.apps.label_server import monailabel_imports

monailabel_imports()
from uniseg_monai.apps.label_app import UniSegLabelApp  # noqa: E402, F401
'''
DEFAULT_APP_DIR = Path.home() / ".cache" / "uniseg" / "label_app"


def _stand_in(name: str, why: str) -> types.ModuleType:
    """A module whose every public attribute is a function raising ``why``."""

    def unavailable(*args: Any, **kwargs: Any) -> None:
        raise UsageError(why)

    def attribute(attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return unavailable

    module = types.ModuleType(name)
    module.__getattr__ = attribute  # type: ignore[method-assign]
    return module


def monailabel_imports() -> None:
    """Register the stand-ins for ``torchvision`` and ``pydicom_seg`` where they do not import (module docstring)."""
    try:
        import torchvision.utils  # noqa: F401
    except Exception:  # not installed, or a CUDA build that fails to load
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        utils = _stand_in("torchvision.utils", "torchvision is not installed (2D pathology helpers of MONAI Label)")
        package = _stand_in("torchvision", "torchvision is not installed")
        package.utils = utils
        sys.modules.update({"torchvision": package, "torchvision.utils": utils})
    try:
        import pydicom_seg  # noqa: F401
    except Exception:  # not installed, or broken under pydicom 3
        sys.modules.pop("pydicom_seg", None)
        sys.modules["pydicom_seg"] = _stand_in(
            "pydicom_seg",
            "MONAI Label's own DICOM SEG writer and reader need pydicom-seg, which does not work with pydicom 3: ask "
            'the UniSeg app for DICOM SEG with the request parameter {"dicom_seg": true}; to train, use a local '
            "datastore (a folder of NIfTI images)",
        )


def write_app(app_dir: Path) -> Path:
    """The MONAI Label app folder ``app_dir`` with its ``main.py`` (MONAI Label adds model/, lib/, logs/, bin/); an
    existing different ``main.py`` is never replaced."""
    main = app_dir / "main.py"
    if main.exists() and main.read_text() != APP_MAIN:
        raise UsageError(f"--app_dir {app_dir} holds another main.py: give an empty or new folder as --app_dir")
    app_dir.mkdir(parents=True, exist_ok=True)
    if not main.exists():
        main.write_text(APP_MAIN)
    return app_dir


def label_server(
    studies: str,
    bundle: str | list[str] = DEFAULT_BUNDLE,
    port: int = 8000,
    host: str = "127.0.0.1",
    app_dir: str = "",
) -> None:
    """Run ``monailabel start_server`` on the UniSeg app until interrupted.

    Args:
        studies: the datastore, a folder of NIfTI images (labels go to its labels folder) or the URL of a DICOMweb
            server (Orthanc's ends in /dicom-web).
        bundle: bundle folders or names to serve, comma-separated; each is one model, named after its folder.
        port: the server's port.
        host: the address to listen on (127.0.0.1 serves this machine only, 0.0.0.0 the network).
        app_dir: MONAI Label's app folder for its main.py and logs (default ~/.cache/uniseg/label_app).
    """
    from uniseg_monai.apps.bundles import find_bundle

    names = bundle.split(",") if isinstance(bundle, str) else list(bundle)
    bundles = ",".join(str(find_bundle(b).resolve()) for b in names)
    if not str(studies).startswith(("http://", "https://")) and not Path(studies).is_dir():
        raise UsageError(f"--studies {studies} is no folder: give a folder of NIfTI images or a DICOMweb URL")
    folder = write_app(Path(app_dir) if app_dir else DEFAULT_APP_DIR)
    for key, value in OFFLINE_SETTINGS.items():
        os.environ.setdefault(key, value)
    monailabel_imports()
    from monailabel.main import Main

    sys.argv = ["monailabel", "start_server", "--app", str(folder), "--studies", str(studies), "--host", host,
                "--port", str(int(port)), "--conf", "bundles", bundles,
                "--uvicorn_app", "uniseg_monai.apps.label_asgi:app"]  # fmt: skip
    Main().run()
