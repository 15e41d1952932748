"""Conversion of official UniSeg state dicts (nnU-Net v1 key names, (z, y, x) axes) to this package's.

The architecture is inferred from tensor shapes alone; every 5-D tensor (conv kernels and the universal
prompt) is permuted from (.., z, y, x) to MONAI's (.., x, y, z). Reading and writing files is
:mod:`uniseg_monai.model_io.model_files`' job.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from uniseg_monai.core.errors import UniSegError

OFFICIAL_LICENCE = (
    "Converted from the official UniSeg release (https://github.com/yeerwen/UniSeg), whose weights are licensed "
    "for non-commercial use only; that licence applies to this file whatever the licence of this bundle's code."
)

# official key pattern -> our key (regex replacement); the first match wins
_KEY_RULES = [
    (r"conv_blocks_context\.0\.blocks\.0\.conv_(\d+)\.(weight|bias)", r"encoder.0.0.convs.\1.conv.\2"),
    (r"conv_blocks_context\.0\.blocks\.0\.instnorm\.(weight|bias)", r"encoder.0.0.adn.N.\1"),
    (r"conv_blocks_context\.(\d+)\.blocks\.(\d+)\.conv\.(weight|bias)", r"encoder.\1.\2.conv.\3"),
    (r"conv_blocks_context\.(\d+)\.blocks\.(\d+)\.instnorm\.(weight|bias)", r"encoder.\1.\2.adn.N.\3"),
    (r"conv_blocks_context\.\d+\.(\d+)\.blocks\.0\.conv\.(weight|bias)", r"bottleneck.\1.conv.\2"),
    (r"conv_blocks_context\.\d+\.(\d+)\.blocks\.0\.instnorm\.(weight|bias)", r"bottleneck.\1.adn.N.\2"),
    (r"intermedia_prompt", r"universal_prompt"),
    (r"fusion_layer\.blocks\.(\d+)\.conv\.(weight|bias)", r"fuse.\1.conv.\2"),
    (r"fusion_layer\.blocks\.(\d+)\.instnorm\.(weight|bias)", r"fuse.\1.adn.N.\2"),
    (r"conv_blocks_localization\.(\d+)\.(\d+)\.blocks\.0\.conv\.(weight|bias)", r"decoder.\1.blocks.\2.conv.\3"),
    (r"conv_blocks_localization\.(\d+)\.(\d+)\.blocks\.0\.instnorm\.(weight|bias)", r"decoder.\1.blocks.\2.adn.N.\3"),
    (r"tu\.(\d+)\.weight", r"decoder.\1.upsample.conv.weight"),
    (r"seg_outputs(?:_down)?\.(\d+)\.weight", r"heads.\1.conv.weight"),
]


class OfficialCheckpointError(UniSegError, ValueError):
    """The file is not an official UniSeg checkpoint this converter understands."""


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix a (Distributed)DataParallel-wrapped network leaves on every key."""
    if state and all(k.startswith("module.") for k in state):
        return {k.removeprefix("module."): v for k, v in state.items()}
    return state


def official_key(key: str) -> str:
    """Our parameter name for an official state-dict key."""
    for pattern, replacement in _KEY_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    raise OfficialCheckpointError(f"unknown key in official state dict: {key!r}")


def _xyz(shape: torch.Size) -> list[int]:
    """(z, y, x) kernel/prompt spatial shape -> [x, y, z]."""
    return [int(v) for v in reversed(shape)]


def infer_network_def(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """MONAI bundle config (``_target_`` + constructor arguments) of the network a state dict belongs to."""
    ctx = "conv_blocks_context"
    if f"{ctx}.0.blocks.1.conv.weight" not in state or "tu.0.weight" not in state:
        raise OfficialCheckpointError("state dict has no nnU-Net encoder/decoder: not an official UniSeg checkpoint")
    num_stages = 1 + max(int(k.split(".")[1]) for k in state if k.startswith(ctx + "."))
    last = num_stages - 1
    weights = [state[f"{ctx}.{s}.blocks.1.conv.weight"] for s in range(last)] + [
        state[f"{ctx}.{last}.1.blocks.0.conv.weight"]
    ]
    strides = [[1, 1, 1]] + [_xyz(state[f"tu.{last - s}.weight"].shape[2:]) for s in range(1, num_stages)]
    stems = sorted(
        int(m.group(1)) for k in state if (m := re.fullmatch(rf"{ctx}\.0\.blocks\.0\.conv_(\d+)\.weight", k))
    )
    heads = "seg_outputs" if "seg_outputs.0.weight" in state else "seg_outputs_down"
    args: dict[str, Any] = {
        "num_classes": int(state[f"{heads}.0.weight"].shape[0]),
        "in_channels": stems,
        "features": [int(w.shape[0]) for w in weights],
        "kernel_sizes": [_xyz(w.shape[2:]) for w in weights],
        "strides": strides,
    }
    if "intermedia_prompt" not in state:
        return {"_target_": "uniseg_monai.networks.UniSegBackbone", **args}
    prompt = state["intermedia_prompt"]
    total = [math.prod(s[a] for s in strides) for a in range(3)]
    fuse_blocks = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("fusion_layer."))
    return {
        "_target_": "uniseg_monai.networks.UniSeg",
        "num_tasks": int(prompt.shape[1]),
        "patch_size": [p * t for p, t in zip(_xyz(prompt.shape[2:]), total)],
        **args,
        "fuse_blocks": fuse_blocks,
    }


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official state dict -> ours: renamed, 5-D tensors permuted from (.., z, y, x) to (.., x, y, z)."""
    return {
        official_key(k): (v.permute(0, 1, 4, 3, 2) if v.ndim == 5 else v).contiguous().clone() for k, v in state.items()
    }
