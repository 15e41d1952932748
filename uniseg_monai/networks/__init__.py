"""UniSeg networks in MONAI's (x, y, z) axis convention."""

from uniseg_monai.networks.uniseg import UniSeg, UniSegBackbone, nnunet_features

__all__ = ["UniSeg", "UniSegBackbone", "nnunet_features"]
