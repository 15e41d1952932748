"""uniseg-monai: the UniSeg universal 3D segmentation model as MONAI bundles.

Layers, bottom to top (docs/ARCHITECTURE.md; ``lint-imports`` enforces the direction): ``core``, ``tasks``,
``networks``, ``data`` | ``model_io``, ``engine``, ``apps``, ``cli``. The module paths of 0.4 still resolve
(:mod:`uniseg_monai._moved`).
"""

from uniseg_monai import _moved
from uniseg_monai.core.notices import silence_absent_gpu_dicom_decoder

__version__ = "0.4.0"

_moved.install()
silence_absent_gpu_dicom_decoder()


def __getattr__(name: str):  # an old module path as an attribute: uniseg_monai.transforms
    return _moved.package_attribute(name)
