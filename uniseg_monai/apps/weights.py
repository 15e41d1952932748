"""``uniseg weights`` and ``uniseg convert-official --bundle``: put pretrained weights into a bundle.

A bundle's ``large_files.yml`` names its weights (``path``, ``url``, ``hash_val``, ``hash_type``); the pretrain
bundle's are the official UniSeg release (``models/model.pt``), the fine-tuning bundles list the same file as their
starting point (``models/pretrained.pt``, the default of their ``pretrained`` id). The download is checked before
anything is installed: it must be a model file of the bundle's architecture (every tensor name and shape), an
official container is converted on the fly, and the result is written atomically as a self-describing model file
with ``<name>_provenance.json`` beside it (source, sha256, licence). An existing file is never replaced without
``overwrite``; a failed download or check leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse
from urllib.request import urlopen

import yaml

from uniseg_monai.apps.bundles import find_bundle
from uniseg_monai.core.atomic import write_text_atomic
from uniseg_monai.core.errors import USER_ERRORS, UsageError
from uniseg_monai.model_io.model_files import (
    ModelFile,
    ModelFileError,
    check_destination,
    mismatch,
    official_provenance,
    read_model,
    save_model,
    sha256,
)
from uniseg_monai.model_io.transfer import PretrainedCheckpointError, transfer_state
from uniseg_monai.tasks import load_model_tasks

UNSTATED_LICENCE = "not stated in the file: ask its provider"


def large_file_entry(bundle: Path) -> dict[str, Any]:
    """The weights entry of ``<bundle>/large_files.yml``."""
    path = bundle / "large_files.yml"
    try:
        entries = yaml.safe_load(path.read_text())["large_files"]
        entry = next(e for e in entries if str(e["path"]).endswith(".pt"))
    except (FileNotFoundError, KeyError, TypeError, StopIteration, yaml.YAMLError) as err:
        reason = " ".join(str(err).split())
        raise ModelFileError(f"{path}: no weights entry (a large_files list with a .pt path): {reason}") from None
    target = (bundle / str(entry["path"])).resolve()
    if not target.is_relative_to(bundle.resolve()):
        raise ModelFileError(f"{path}: the weights path {entry['path']!r} leaves the bundle folder; use models/NAME.pt")
    return entry


def local_source(source: str) -> Path | None:
    """The file a weights source names when it is a path (C:\\ on Windows) or a ``file://`` URL, else None."""
    parsed = urlparse(source)
    if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:
        return Path(unquote(parsed.path) if parsed.scheme == "file" else source)
    return None


def fetch(source: str, dst: Path, hash_val: str = "", hash_type: str = "sha256") -> None:
    """Copy a local path or ``file://`` URL, or download an http(s) / Google Drive URL with MONAI's
    ``download_url`` (gdown for Google Drive), to ``dst``; ``hash_val`` is checked when given."""
    from monai.apps.utils import HashCheckError, download_url

    try:  # gdown >= 6 (its FileURLRetrievalError derives from DownloadError)
        from gdown.exceptions import DownloadError as GdownError
    except ImportError:  # gdown 5
        from gdown.exceptions import FileURLRetrievalError as GdownError

    local = local_source(source)
    if local is not None:
        if not local.is_file():
            raise FileNotFoundError(f"weights {source} not found (a file path, file://, http(s) or Google Drive URL)")
        shutil.copyfile(local, dst)
        source = local.resolve().as_uri()
        if not hash_val:
            return
    monai_log = logging.getLogger("monai.apps")  # MONAI logs each failure ("Download failed ..."): ours is the line
    errors_only = _BelowError()
    monai_log.addFilter(errors_only)
    try:
        if urlparse(source).netloc not in ("drive.google.com", "cloud-api.yandex.net"):  # MONAI's other routes
            urlopen(source, timeout=60).close()  # a refused request fails here, before MONAI draws a progress bar
        with warnings.catch_warnings():  # no published hash: download_weights says so once, with the file's sha256
            warnings.filterwarnings("ignore", message="No hash value provided", category=UserWarning)
            download_url(source, filepath=dst, hash_val=hash_val or None, hash_type=hash_type, progress=True)
    except HashCheckError:
        raise ModelFileError(
            f"the weights downloaded from {source} do not have the published {hash_type} {hash_val}: damaged on the "
            "way or changed at the source; download again, or ask its provider for the current hash"
        ) from None
    except (*USER_ERRORS, ValueError, RuntimeError, GdownError) as err:  # one line for the user: network (OSError),
        # a wrong hash or URL (ValueError), MONAI's and gdown's failed downloads (RuntimeError, gdown's DownloadError)
        raise ModelFileError(f"could not fetch the weights from {source}: {type(err).__name__}: {err}") from err
    finally:
        monai_log.removeFilter(errors_only)


class _BelowError(logging.Filter):
    """Lets through log records below ERROR: the failures it drops are raised as the command's one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def _bundle_network(bundle: Path, model: ModelFile):
    """The network the bundle's ``inference.json`` builds for a model with ``model``'s task table."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    parser.update({"bundle_root": str(bundle), "ckpt_dir": str(bundle / "models")})
    if model.tasks is not None and "num_tasks" in parser["network_def"]:
        parser["registry"] = model.tasks
    return parser.get_parsed_content("network_def")


def check_fits(model: ModelFile, bundle: Path, dst: Path, source: str) -> None:
    """``models/model.pt``: the file loads strictly into the bundle's network; ``models/pretrained.pt``: its
    encoder-decoder transfers into it (:func:`uniseg_monai.model_io.transfer.transfer_state`). Errors name
    ``source``."""
    network = _bundle_network(bundle, model)
    kind = (model.network_def or {}).get("_target_", "a model").rsplit(".", 1)[-1]
    if dst.name == "pretrained.pt":
        try:
            transfer_state(network, model.state, source)
        except PretrainedCheckpointError as err:
            raise ModelFileError(f"not a pretrained UniSeg for bundle {bundle}: {err}") from None
        return
    try:
        network.load_state_dict(model.state, strict=True)
    except RuntimeError as err:
        raise ModelFileError(
            f"{source}: {kind} does not fit bundle {bundle}'s network ({mismatch(network, model, err)}); choose the "
            "matching bundle"
        ) from None


def install(model: ModelFile, bundle: Path, dst: Path, source: str, tool: str) -> dict[str, Any]:
    """Check a read model file against ``bundle`` and write it to ``dst`` as a self-describing model file with
    provenance; ``source`` is what the user gave (URL or path)."""
    src = model.path
    if model.official and model.tasks is None:  # an official downstream model: the bundle's task
        model.tasks = load_model_tasks(bundle / "models")
    if model.network_def is None or model.tasks is None:
        raise ModelFileError(f"{source}: not a UniSeg model file (no network description or task table)")
    check_fits(model, bundle, dst, source)
    if model.official:
        provenance = official_provenance(src, tool, url=source)
    else:
        provenance = {"licence": UNSTATED_LICENCE, **(model.provenance or {}), "source": source}
        provenance["source_sha256"] = sha256(src)
    save_model(dst, model.state, model.network_def, model.tasks, provenance)
    record = {**provenance, "model": str(dst), "model_sha256": sha256(dst), "network_def": model.network_def}
    sidecar = dst.with_name(f"{dst.stem}_provenance.json")
    write_text_atomic(sidecar, json.dumps(record, indent=2) + "\n")
    return {"dst": str(dst), "provenance": str(sidecar), "tasks": model.tasks.names, "licence": provenance["licence"]}


def download_weights(bundle: str | os.PathLike, url: str = "", overwrite: bool = False) -> dict[str, Any]:
    """``uniseg weights``: fetch the weights ``large_files.yml`` names (or ``url``: an http(s) / Google Drive URL, a
    ``file://`` URL or a local path) into the bundle, checked and converted (see the module docstring)."""
    folder = find_bundle(bundle)
    entry = large_file_entry(folder)
    dst = folder / entry["path"]
    source = url or entry.get("url") or ""
    local = local_source(source) if source else None
    if local is not None and local.is_dir():
        given = "--url" if url else "the url of large_files.yml"
        raise UsageError(f"{given} {source} is a folder: give the weights file")
    if local is not None:  # never the file it would replace
        check_destination(local, dst, "the weights path")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (trained or fetched earlier); pass --overwrite to replace it")
    if not source:
        raise ModelFileError(f"{folder / 'large_files.yml'} names no url for {entry['path']}: pass --url")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".download-") as tmp:
        name = Path(unquote(urlparse(source).path)).name
        raw = Path(tmp) / (name if Path(name).suffix else "weights")  # the progress bar's label
        hash_val = "" if url else str(entry.get("hash_val") or "")
        fetch(source, raw, hash_val, str(entry.get("hash_type") or "sha256"))
        checked = f"{entry.get('hash_type') or 'sha256'} checked against large_files.yml" if hash_val else ""
        integrity = checked or f"not verified (no published hash to check); its sha256 is {sha256(raw)}"
        return {**install(read_model(raw, name=source), folder, dst, source, "uniseg weights"), "integrity": integrity}


def convert_into_bundle(src: str | os.PathLike, bundle: str | os.PathLike, overwrite: bool = False) -> dict[str, Any]:
    """``uniseg convert-official SRC --bundle B``: weights that load into the bundle's network become its
    ``models/model.pt``; upstream weights given to a fine-tuning bundle become its ``models/pretrained.pt``."""
    folder, src = find_bundle(bundle), Path(src)
    model = read_model(src)
    if not model.official:
        raise ModelFileError(f"{src}: not an official UniSeg checkpoint (no nnU-Net key names)")
    network = _bundle_network(folder, model)
    upstream_into_backbone = "num_tasks" in (model.network_def or {}) and not hasattr(network, "num_tasks")
    dst = folder / "models" / ("pretrained.pt" if upstream_into_backbone else "model.pt")
    check_destination(src, dst, "the bundle's model file")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
    return install(model, folder, dst, str(src.resolve()), "uniseg convert-official --bundle")  # read once
