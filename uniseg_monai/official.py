"""Conversion of official UniSeg checkpoints (nnU-Net v1 key names, (z, y, x) axes) to this package.

The architecture is inferred from tensor shapes alone; every 5-D tensor (conv kernels and the universal
prompt) is permuted from (.., z, y, x) to MONAI's (.., x, y, z).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from uniseg_monai.atomic import write_atomic, write_text_atomic

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


class OfficialCheckpointError(ValueError):
    """The file is not an official UniSeg checkpoint this converter understands."""


def load_weights_only(path: str | os.PathLike, error: type[Exception] = OfficialCheckpointError) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a file needing arbitrary unpickling raises ``error``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise error(
            f"{path}: refused to load: it needs arbitrary unpickling, which can run code "
            f"(weights_only=True failed: {str(err).splitlines()[0]}). Re-save its state_dict with torch.save."
        ) from err


def load_official_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an official ``.model`` file (a dict with ``state_dict``) or a bare state dict, never unpickling code."""
    obj = load_weights_only(path)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise OfficialCheckpointError(f"{path}: expected a dict with a 'state_dict' of tensors (an official .model)")
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


def build_network(network_def: dict[str, Any]) -> torch.nn.Module:
    """Instantiate a network from its bundle config, as ``monai.bundle`` would."""
    from monai.bundle import ConfigParser

    return ConfigParser({"network": network_def}).get_parsed_content("network")


def save_atomic(obj: Any, dst: Path) -> None:
    """``torch.save`` to a temporary file beside ``dst``, then rename: never a half-written ``dst``."""
    write_atomic(dst, lambda f: torch.save(obj, f))


def convert_official(src: str | os.PathLike, dst: str | os.PathLike, overwrite: bool = False) -> dict[str, Any]:
    """Convert an official checkpoint to ``{"model": state_dict, "network_def": config}`` at ``dst``.

    The converted weights are loaded strictly into the network built from ``network_def`` before anything is
    written; ``dst`` is written atomically and an existing file is kept unless ``overwrite``.
    """
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
    state = load_official_state_dict(src)
    network_def = infer_network_def(state)
    model = convert_state_dict(state)
    net = build_network(network_def)
    try:
        net.load_state_dict(model, strict=True)
    except RuntimeError as err:
        raise OfficialCheckpointError(f"{src}: converted weights do not fit the inferred network: {err}") from err
    save_atomic({"model": model, "network_def": network_def}, dst)
    return {
        "kind": "upstream" if "num_tasks" in network_def else "downstream",
        "network_def": network_def,
        "parameters": sum(p.numel() for p in net.parameters()),
        "dst": str(dst),
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_official_to_bundle(src: str | os.PathLike, bundle: str | os.PathLike, overwrite: bool = False) -> dict:
    """Convert an official checkpoint straight into ``<bundle>/models/model.pt`` (a state dict, as the bundle's
    ``CheckpointLoader`` reads it) and record its provenance and licence in ``models/model_provenance.json``.

    The weights must load strictly into the network the bundle's ``configs/inference.json`` builds (its
    ``network_def`` with the task table in ``models/tasks.json``): upstream weights go to ``uniseg_pretrain``,
    BTCV / VS downstream weights to the fine-tuning bundles. An existing ``model.pt`` is kept unless ``overwrite``.
    """
    from monai.bundle import ConfigParser

    src, models = Path(src), Path(bundle) / "models"
    dst = models / "model.pt"
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
    state = load_official_state_dict(src)
    network_def = infer_network_def(state)
    model = convert_state_dict(state)
    parser = ConfigParser()
    parser.read_config(Path(bundle) / "configs" / "inference.json")
    parser.update({"bundle_root": str(bundle), "ckpt_dir": str(models)})
    try:
        parser.get_parsed_content("network_def").load_state_dict(model, strict=True)
    except RuntimeError as err:
        raise OfficialCheckpointError(
            f"{src}: the official {network_def['_target_'].rsplit('.', 1)[-1]} ({network_def['num_classes']} classes, "
            f"features {network_def['features']}) does not fit bundle {bundle}'s network_def and models/tasks.json; "
            f"choose the matching bundle ({str(err).splitlines()[0]})"
        ) from err
    save_atomic(model, dst)
    provenance = {
        "source": str(src.resolve()),
        "source_sha256": _sha256(src),
        "model_sha256": _sha256(dst),
        "converted_with": "uniseg convert-official --bundle",
        "network_def": network_def,
        "licence": OFFICIAL_LICENCE,
    }
    write_text_atomic(models / "model_provenance.json", json.dumps(provenance, indent=2) + "\n")
    return {
        "dst": str(dst),
        "provenance": str(models / "model_provenance.json"),
        "model_sha256": provenance["model_sha256"],
    }
