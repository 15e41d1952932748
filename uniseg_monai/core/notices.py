"""Notices from optional MONAI parts this package never uses, silenced where the package is imported; ITK's
warning output, silenced where ITK reads a file (:func:`quiet_itk`).

Every ``LoadImage`` builds all of MONAI's default readers, among them ``NvImgCodecPydicomReader`` (GPU decoding of
compressed DICOM). Where pydicom is installed (the ``dicom`` extra) but nvImageCodec and CuPy are not, each one logs
"nvImageCodec is not available" and warns "decoder plugin did not register" — once per loader, per thread and per
process, in every command, although the CPU readers (ITK for DICOM, nibabel for NIfTI) do the reading. They stay
audible when ``MONAI_DICOM_READER=nvimgcodec`` asks for that reader.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from typing import Any

_WARNING = "NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register"
_LOGGER = "monai.data.nvimgcodec_pydicom_plugin"
_LOG_MESSAGE = "nvImageCodec is not available"


def _not_the_absent_decoder(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_LOG_MESSAGE)


def silence_absent_gpu_dicom_decoder() -> None:
    """Drop the two notices unless the user chose nvImageCodec as the DICOM reader (idempotent)."""
    if os.environ.get("MONAI_DICOM_READER", "").strip().lower() in {"nvimgcodec", "nvimgcodecpydicomreader"}:
        return
    warnings.filterwarnings("ignore", message=_WARNING, category=UserWarning)
    logger = logging.getLogger(_LOGGER)
    if _not_the_absent_decoder not in logger.filters:
        logger.addFilter(_not_the_absent_decoder)


NIFTI_SUFFIXES = (".nii", ".nii.gz")  # read by nibabel; everything else (DICOM series folders, NRRD, MHA) by ITK


def quiet_itk(*paths: Any) -> None:
    """Turn off ITK's warning output (its multi-line "WARNING: In .../itkGDCMSeriesFileNames.cxx ... No Series were
    found" on stderr, printed before our one-line error) when any of ``paths`` (str / Path, or lists of them: one
    per channel) is read by ITK; the ITK errors and our messages stay. Once per process; ITK stays unloaded for
    NIfTI-only work."""
    if not _quiet_itk.cache_info().currsize and any(
        not str(p).endswith(NIFTI_SUFFIXES) for p in _flat(paths) if isinstance(p, str | os.PathLike)
    ):
        _quiet_itk()


def _flat(values: Any) -> list[Any]:
    return [v for value in values for v in (_flat(value) if isinstance(value, list | tuple) else [value])]


@functools.cache
def _quiet_itk() -> None:
    import itk

    itk.Object.SetGlobalWarningDisplay(False)
