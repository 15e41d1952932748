"""UniSeg networks in MONAI's (x, y, z) axis convention."""

from uniseg_monai.networks.task_ids import TaskLogits, as_task_ids
from uniseg_monai.networks.uniseg import UniSeg, UniSegBackbone, nnunet_features

__all__ = ["TaskLogits", "UniSeg", "UniSegBackbone", "as_task_ids", "nnunet_features"]
