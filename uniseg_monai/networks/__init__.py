"""UniSeg networks in MONAI's (x, y, z) axis convention, and the universal baselines on the same encoder-decoder."""

from uniseg_monai.networks.baselines import CLIPDoDNet, DoDNet, TaskBlindUniSeg
from uniseg_monai.networks.compiling import compiled
from uniseg_monai.networks.task_ids import TaskLogits, as_task_ids
from uniseg_monai.networks.uniseg import UniSeg, UniSegBackbone, nnunet_features

__all__ = [
    "CLIPDoDNet",
    "DoDNet",
    "TaskBlindUniSeg",
    "TaskLogits",
    "UniSeg",
    "UniSegBackbone",
    "as_task_ids",
    "compiled",
    "nnunet_features",
]
