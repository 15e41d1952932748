"""ONNX export of :class:`~uniseg_monai.networks.UniSeg` and :class:`~uniseg_monai.networks.UniSegBackbone`.

The exported graph, in eval mode (full-resolution logits only, no deep supervision):

- inputs ``image`` (B, C, X, Y, Z) float32 and, for a task-aware network (one with ``num_tasks``, e.g.
  :class:`UniSeg`), ``task_id`` (B,) int64 — one task per sample, as ``UniSeg.forward``;
- output ``logits`` (B, num_classes, X, Y, Z) float32.

B, X, Y and Z are dynamic. X, Y, Z must be multiples of the network's ``total_stride`` — (32, 32, 16) for the
paper's network — with at least twice the stride on one axis (instance norm needs 2 bottleneck voxels); the
graph does not check this: a non-multiple fails inside it (a Concat shape mismatch), a one-voxel bottleneck
runs but gives meaningless logits. ``task_id`` must lie in [0, num_tasks) (ONNX Runtime raises otherwise in
GatherElements); a (1,) ``task_id`` is broadcast over the batch.

C is fixed: one modality stem per file. Tracing picks the stem for the example input's C, and ONNX has no
clean per-shape dispatch (only ``If`` subgraphs, which tracing cannot produce); export once per modality
(1: CT or MR, 2: CT+PET, 4: four MR sequences) to serve several. The unused stems' weights are left out.

Window sizes: while tracing, ``UniSeg.prompt_at`` always resamples the universal prompt to the bottleneck size
taken from the input (exact at ``patch_size``) and ``UniSeg.task_ids`` skips its eager checks, so the graph
serves every admissible window and takes the task ids from its input.

Uses PyTorch's TorchScript-based exporter (``dynamo=False``); the torch.export-based one needs onnxscript.
"""

from __future__ import annotations

import copy
import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from uniseg_monai.apps.bundles import open_inference
from uniseg_monai.core.atomic import write_atomic
from uniseg_monai.core.errors import UniSegError, UsageError
from uniseg_monai.model_io.model_files import check_destination, load_into
from uniseg_monai.networks import UniSeg

SPATIAL_AXES = {2: "x", 3: "y", 4: "z"}


class OnnxCheckError(UniSegError, RuntimeError):
    """The ONNX Runtime output differs from PyTorch's beyond the tolerance (one line: the exported graph is wrong,
    nothing is written)."""


def _is_task_aware(network: nn.Module) -> bool:
    return isinstance(network, UniSeg) or hasattr(network, "num_tasks")


def _traceable_copy(network: nn.Module) -> nn.Module:
    """A float32 CPU eval-mode copy of ``network`` to trace or compare with (the caller's network keeps its device
    and mode)."""
    return copy.deepcopy(network).float().cpu().eval()


def _example(network: nn.Module, batch: int, in_channels: int, window: Sequence[int], seed: int) -> tuple:
    """Random inputs: image (batch, C, *window) and, for task-aware networks, task ids spanning the tasks."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, in_channels, *window, generator=gen)
    if not _is_task_aware(network):
        return (image,)
    num_tasks = int(network.num_tasks)
    ids = torch.linspace(0, num_tasks - 1, batch).round().long() if batch > 1 else torch.zeros(1, dtype=torch.long)
    return image, ids


def export_onnx(
    network: nn.Module,
    path: str | os.PathLike,
    in_channels: int = 1,
    window: Sequence[int] | None = None,
    dynamic_spatial: bool = True,
    opset: int = 17,
    check: bool = True,
    overwrite: bool = False,
    rtol: float = 1e-4,
) -> dict[str, Any]:
    """Export ``network`` to an ONNX file at ``path`` (written atomically); the network itself is not modified.

    Args:
        network: a :class:`UniSeg` (inputs ``image``, ``task_id``) or a task-free network such as
            :class:`UniSegBackbone` (input ``image``); any device and mode — a float32 CPU eval copy is exported.
        path: the ``.onnx`` file; an existing one is refused unless ``overwrite``.
        in_channels: C of ``image``, which selects the one modality stem in the graph.
        window: (X, Y, Z) of the traced example and of the check; default the network's ``patch_size``
            (required for networks without one). A multiple of ``total_stride``.
        dynamic_spatial: X, Y, Z dynamic (any admissible window); False fixes them to ``window``.
        opset: ONNX opset.
        check: run ONNX Runtime (CPU) on a random batch of 2 at ``window`` (task ids 0 and N-1) before the file
            is written, and raise :class:`OnnxCheckError` if the max abs difference to PyTorch exceeds ``rtol`` times
            the output scale (:func:`check_onnx`).
        overwrite: replace an existing file.
        rtol: tolerance of the check, relative to the output scale.

    Returns:
        ``{"path", "input_names", "output_names", "in_channels", "window", "dynamic_axes", "opset",
        "max_abs_diff"}``, ``max_abs_diff`` None without ``check``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if window is None:
        if not hasattr(network, "universal_prompt"):
            raise UsageError(f"give the window (X, Y, Z) to export a {type(network).__name__}")
        stride = network.total_stride
        window = [int(n) * s for n, s in zip(network.universal_prompt.shape[2:], stride)]
    window = [int(n) for n in window]
    if len(window) != 3:
        raise UsageError(f"window must be (X, Y, Z), got {window}")

    net = _traceable_copy(network)
    example = _example(net, 1, in_channels, window, seed=0)
    if hasattr(net, "check_input"):  # a clear error for a bad window or channel count, before tracing
        try:
            net.check_input(example[0])
        except ValueError as err:
            raise UsageError(f"cannot export with in_channels {in_channels} at window {window}: {err}") from None
    input_names = ["image", "task_id"][: len(example)]
    output_names = ["logits"]
    spatial = SPATIAL_AXES if dynamic_spatial else {}
    dynamic_axes: dict[str, dict[int, str]] = {"image": {0: "batch", **spatial}, "logits": {0: "batch", **spatial}}
    if len(example) == 2:
        dynamic_axes["task_id"] = {0: "batch"}

    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer / legacy-exporter / instance-norm notices; the check is the test
        torch.onnx.export(
            net,
            example,
            buffer,
            dynamo=False,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
        )
    model = buffer.getvalue()

    max_abs_diff = None
    if check:
        max_abs_diff = check_onnx(model, network, in_channels, window, rtol=rtol)
    write_atomic(path, lambda f: f.write(model))
    return {
        "path": str(path),
        "input_names": input_names,
        "output_names": output_names,
        "in_channels": in_channels,
        "window": window,
        "dynamic_axes": dynamic_axes,
        "opset": opset,
        "max_abs_diff": max_abs_diff,
    }


def run_onnx(model: bytes | str | os.PathLike, *inputs: torch.Tensor | np.ndarray) -> np.ndarray:
    """Run an exported model with ONNX Runtime on CPU: ``image`` (B, C, X, Y, Z) [, ``task_id`` (B,)] -> logits."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        model if isinstance(model, bytes) else str(model), providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise ValueError(f"the model takes inputs {names}, got {len(inputs)} arrays")
    feed = {n: np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v) for n, v in zip(names, inputs)}
    return session.run(None, feed)[0]


def check_onnx(
    model: bytes | str | os.PathLike,
    network: nn.Module,
    in_channels: int,
    window: Sequence[int],
    rtol: float = 1e-4,
    batch: int = 2,
    seed: int = 1,
) -> float:
    """Max abs difference between ONNX Runtime and ``network`` (eval, float32, CPU) on a random window.

    Raises:
        OnnxCheckError: the difference exceeds ``rtol`` times the output scale (max |logit|, at least 1), as the
            official parity test compares: float32 sums over large windows differ by more than a fixed 1e-4.
    """
    reference = _traceable_copy(network)
    inputs = _example(reference, batch, in_channels, window, seed)
    with torch.no_grad():
        expected = reference(*inputs).numpy()
    actual = run_onnx(model, *inputs)
    if actual.shape != expected.shape:
        raise OnnxCheckError(f"ONNX output shape {actual.shape} != PyTorch {expected.shape}")
    diff = float(np.abs(actual - expected).max())
    tol = rtol * max(1.0, float(np.abs(expected).max()))
    if not diff <= tol:
        raise OnnxCheckError(
            f"ONNX Runtime differs from PyTorch by {diff:.3g} (> {tol:.3g}, {rtol:g} of the output scale) at window "
            f"{list(window)}: the exported graph is wrong; nothing written (report it with the model and window)"
        )
    return diff


def export_bundle_onnx(
    bundle_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    in_channels: int = 1,
    window: Sequence[int] | None = None,
    ckpt: str | os.PathLike | None = None,
    overwrite: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Export a bundle's trained network: the model file's own network (or the bundle's ``network_def``) with
    its weights.

    Args:
        bundle_dir: the bundle folder or name (:func:`uniseg_monai.apps.bundles.find_bundle`).
        out_path: the ``.onnx`` file.
        in_channels, overwrite: as :func:`export_onnx`.
        window: default the model's ``patch_size``.
        ckpt: the model file, default ``<bundle>/models/model.pt`` (every file
            :func:`uniseg_monai.model_io.model_files.read_model` reads).
        overrides: config ids to set before parsing (e.g. ``base_features``, ``patch_size``).

    Returns:
        :func:`export_onnx`'s dict, plus ``"ckpt"``.

    Raises:
        UsageError: ``out_path`` is the model file itself (also through a link), even with ``overwrite``.
    """
    check_destination(None, out_path, "--onnx", "model.onnx")  # a folder: not "exists; pass --overwrite"
    if Path(out_path).exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists; pass --overwrite to replace it")
    parser, model = open_inference(bundle_dir, ckpt, overrides)
    check_destination(model.path, out_path, "--onnx", "model.onnx")
    network = parser.get_parsed_content("network_def")
    load_into(network, model)
    if window is None:
        window = parser.get_parsed_content("patch_size")
    result = export_onnx(network, out_path, in_channels=in_channels, window=window, overwrite=overwrite)
    return {**result, "ckpt": str(model.path)}
