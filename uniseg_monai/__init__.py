"""uniseg-monai: the UniSeg universal 3D segmentation model as MONAI bundles."""

__version__ = "0.4.0"
