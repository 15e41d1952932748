"""``uniseg label-server``: MONAI Label's server (``monailabel start_server``, 0.8.5) on the UniSeg app
(:mod:`uniseg_monai.apps.label_app`), offline on a CPU (README: "MONAI Label / 3D Slicer").

MONAI Label imports two packages at server start that this package's environment cannot import: ``torchvision``
(``make_grid`` / ``save_image`` for 2D pathology; PyPI has no CPU build for the CPU torch) and ``pydicom_seg``
(MONAI Label's own DICOM SEG writer and reader; it fails under pydicom 3, MONAI Label issue #1841). Where they do not
import, :func:`monailabel_imports` registers stand-ins whose every use raises one line saying why; the UniSeg app
never uses them (it writes DICOM SEG with :func:`uniseg_monai.data.dicom_seg.build_seg`).
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import types
from pathlib import Path
from typing import Any

from uniseg_monai.apps.bundles import DEFAULT_BUNDLE, check_weights
from uniseg_monai.core.errors import UsageError
from uniseg_monai.model_io.model_files import MODEL_FILE

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


def check_address(host: str, port: Any) -> None:
    """Refuse, in one line naming ``--port`` or ``--host``, an address the server could not listen on: a port that is
    no whole number in 1..65535, a host that does not resolve or is not this machine's, a port in use. Proven by
    binding a socket there (as uvicorn will, with SO_REUSEADDR) and releasing it."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise UsageError(f"--port takes a whole number from 1 to 65535 (e.g. 8000), got {port!r}")
    fix = "give an address of this machine (127.0.0.1 serves this machine only, 0.0.0.0 the network)"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise UsageError(f"--host {host} does not resolve ({getattr(err, 'strerror', None) or err}): {fix}") from None
    try:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise UsageError(f"--port {port} is in use on {host} (another server?): choose another --port") from None
        if err.errno == errno.EACCES:
            raise UsageError(f"--port {port} needs root (ports below 1024): choose a --port from 1024") from None
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({err.strerror}): {fix}") from None


def write_app(app_dir: Path) -> Path:
    """The MONAI Label app folder ``app_dir`` with its ``main.py`` (MONAI Label adds model/, lib/, logs/, bin/); an
    existing different ``main.py`` is never replaced."""
    if app_dir.exists() and not app_dir.is_dir():
        raise UsageError(f"--app_dir {app_dir} is a file: give a folder for MONAI Label's app (created if missing)")
    main = app_dir / "main.py"
    if main.exists() and main.read_text() != APP_MAIN:
        raise UsageError(f"--app_dir {app_dir} holds another main.py: give an empty or new folder as --app_dir")
    try:
        app_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--app_dir {app_dir} cannot be created ({err.strerror}): give another folder") from None
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
        port: the server's port, a free one from 1 to 65535.
        host: the address to listen on (127.0.0.1 serves this machine only, 0.0.0.0 the network); both are checked
            by binding a socket before the server starts.
        app_dir: MONAI Label's app folder for its main.py and logs (default ~/.cache/uniseg/label_app).
    """
    from uniseg_monai.apps.bundles import find_bundle

    names = bundle.split(",") if isinstance(bundle, str) else list(bundle)
    folders = {name: find_bundle(name).resolve() for name in names}
    if not str(studies).startswith(("http://", "https://")) and not Path(studies).is_dir():
        raise UsageError(f"--studies {studies} is no folder: give a folder of NIfTI images or a DICOMweb URL")
    for name, found in folders.items():
        check_weights(found / "models" / MODEL_FILE, name)
    check_address(host, port)
    folder = write_app(Path(app_dir) if app_dir else DEFAULT_APP_DIR)
    for key, value in OFFLINE_SETTINGS.items():
        os.environ.setdefault(key, value)
    monailabel_imports()
    from monailabel.main import Main

    sys.argv = ["monailabel", "start_server", "--app", str(folder), "--studies", str(studies), "--host", host,
                "--port", str(port), "--conf", "bundles", ",".join(map(str, folders.values())),
                "--uvicorn_app", "uniseg_monai.apps.label_asgi:app"]  # fmt: skip
    Main().run()
