"""Transfer of pretrained UniSeg weights into a downstream :class:`~uniseg_monai.networks.UniSegBackbone`.

As the paper's downstream fine-tuning: every encoder/decoder tensor of the pretrained model is copied by
name; the first transposed conv (``prompt_widened_key``: (in, out, x, y, z), with the task prompt as the last
input channel upstream) loses the prompt's input channel(s); the universal prompt and FUSE (``UniSeg.prompt_keys``)
have no downstream counterpart; the heads (``head_keys``) keep the downstream network's own fresh initialisation,
for any class count and any source (an upstream UniSeg or a downstream backbone); nothing is frozen. The networks
declare these parts as class attributes.

Accepted checkpoints: every file :func:`uniseg_monai.model_io.model_files.read_model` reads (a pretrain bundle's
``models/model.pt`` or training checkpoint, a converted official checkpoint, a raw official ``.model`` converted
on the fly, a bare state dict), never unpickling code.

The transfer is all or nothing: a missing or mis-shaped encoder/decoder tensor raises
:class:`PretrainedCheckpointError` naming the file, the key and the shapes, before any weight is changed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from uniseg_monai.model_io.model_files import OFFICIAL_LICENCE, ModelFileError, read_model
from uniseg_monai.networks import UniSeg, UniSegBackbone

logger = logging.getLogger(__name__)

PRETRAINED_FILE = "models/pretrained.pt"  # a fine-tuning bundle's starting point, fetched by `uniseg weights`


class PretrainedCheckpointError(ModelFileError):
    """A pretrained checkpoint that cannot be read or does not fit the downstream network."""


@dataclass
class TransferReport:
    """What a transfer did.

    Attributes:
        source: the checkpoint file (or a description of the in-memory state dict).
        loaded: downstream keys copied from the checkpoint.
        adapted: loaded keys whose tensor was cut to fit, with what was cut.
        skipped: checkpoint keys not transferred, with the reason.
        initialised: downstream keys left at the network's own initialisation (the heads).
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    initialised: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the log."""
        reasons = sorted(set(self.skipped.values()))
        return (
            f"{self.source}: loaded {len(self.loaded)} tensors ({len(self.adapted)} adapted: "
            f"{'; '.join(f'{k} {v}' for k, v in self.adapted.items()) or '-'}); skipped {len(self.skipped)} "
            f"({'; '.join(reasons) or '-'}); {len(self.initialised)} left at init ({', '.join(self.initialised)})"
        )


def transfer_state(
    network: UniSegBackbone, state: dict[str, torch.Tensor], source: str = "<state dict>"
) -> TransferReport:
    """Copy every non-head tensor of ``state`` (our key names) into ``network``, in place.

    An upstream state (with keys under ``UniSeg.prompt_keys``) has ``UniSeg.task_prompt_channels`` more input
    channels in ``prompt_widened_key`` — (F_bottleneck + 1, F, x, y, z) — than the backbone's
    (F_bottleneck, F, x, y, z); the last ones (the task prompt) are dropped.

    Raises:
        PretrainedCheckpointError: a non-head tensor of ``network`` is missing from ``state`` or its shape
            differs (e.g. a checkpoint of another width or depth); ``network`` is then left unchanged.
    """
    report = TransferReport(source)
    upstream = any(key.startswith(UniSeg.prompt_keys) for key in state)
    extra = (UniSeg.task_prompt_channels if upstream else 0) - network.task_prompt_channels
    target = network.state_dict()
    weights: dict[str, torch.Tensor] = {}
    for key, current in target.items():
        if key.startswith(network.head_keys):
            report.initialised.append(key)
            continue
        if key not in state:
            raise PretrainedCheckpointError(
                f"{source}: {key} {tuple(current.shape)} is missing from the checkpoint: not a pretrained model "
                "of this architecture"
            )
        value = state[key]
        if key == network.prompt_widened_key and extra > 0 and value.shape[0] == current.shape[0] + extra:
            value = value[: current.shape[0]]
            report.adapted[key] = f"dropped the last {extra} input channel(s) (task prompt)"
        if value.shape != current.shape:
            raise PretrainedCheckpointError(
                f"{source}: {key} has shape {tuple(state[key].shape)} in the checkpoint but "
                f"{tuple(current.shape)} in the network: the checkpoint is of another width, depth or kernel size"
            )
        weights[key] = value
    network.load_state_dict({**target, **weights}, strict=True)
    report.loaded = list(weights)
    for key in state:
        if key not in weights:
            report.skipped[key] = (
                "head: fresh for the downstream classes"
                if key.startswith(network.head_keys)
                else "universal prompt / FUSE: none downstream"
                if key.startswith(UniSeg.prompt_keys)
                else "not in the downstream network"
            )
    return report


def load_pretrained(network: UniSegBackbone, path: str | os.PathLike) -> TransferReport:
    """Load the pretrained checkpoint at ``path`` into ``network`` (in place) by :func:`transfer_state`.

    The weights' licence goes with them: ``network.pretrained_provenance`` (the file and its provenance; the
    official licence for an official file), which the bundles' checkpoints then record (``model_files.description``).
    """
    try:
        model = read_model(path)
    except ModelFileError as err:
        raise PretrainedCheckpointError(str(err)) from err
    report = transfer_state(network, model.state, str(path))
    provenance = model.provenance or ({"licence": OFFICIAL_LICENCE} if model.official else {})
    network.pretrained_provenance = {"pretrained": str(Path(path).resolve()), **provenance}
    return report


def pretrained_network(network: UniSegBackbone, path: str | os.PathLike | None = "") -> UniSegBackbone:
    """``network`` with pretrained weights from ``path`` (logged), or unchanged for an empty path.

    For bundle configs: ``"network": "$uniseg_monai.model_io.transfer.pretrained_network(@network_def, @pretrained)"``.
    """
    if not path:
        logger.warning(
            "no pretrained checkpoint: training from scratch (`uniseg weights --bundle BUNDLE` fetches the official "
            "UniSeg pretraining to %s, or pass --pretrained FILE)",
            PRETRAINED_FILE,
        )
        return network
    if not isinstance(network, UniSegBackbone):
        raise PretrainedCheckpointError(
            f"{path}: UniSeg weights load into a UniSegBackbone only, not a {type(network).__name__}; "
            "set pretrained to '' for this network"
        )
    logger.info("pretrained weights: %s", load_pretrained(network, path).summary())
    return network


def bundle_pretrained(bundle_root: str | os.PathLike) -> str:
    """The default of a fine-tuning bundle's ``pretrained`` id: ``<bundle_root>/models/pretrained.pt`` when it
    exists (``uniseg weights`` puts it there), else '' (from scratch, with a warning in the log)."""
    path = Path(bundle_root) / PRETRAINED_FILE
    return str(path) if path.is_file() else ""
