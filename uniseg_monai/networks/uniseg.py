"""The UniSeg network (Ye et al., MICCAI 2023) and its downstream backbone, in MONAI's axis convention.

Spatial axes are (X, Y, Z) as MONAI loads NIfTI. The paper's 64x192x192 (z, y, x) patch is therefore
``patch_size=(192, 192, 64)``, the stage-0 kernel is (3, 3, 1) and the stage-1 stride (2, 2, 1).

Pieces of the paper's Fig. 2, each a named attribute:

- ``encoder[0][0]`` — :class:`ModalityStems`: the first conv of stage 0 for 1, 2 and 4 input channels.
- ``encoder`` — stages 0..4 (two conv blocks each, stride on the first) and ``bottleneck`` — stage 5.
- ``universal_prompt`` — learnable (1, N, X/32, Y/32, Z/16) tensor shared by all tasks.
- ``fuse`` — FUSE: cat(bottleneck, universal prompt) -> 3 conv blocks -> N task prompts.
- :meth:`UniSeg.select_task_prompt` — picks each sample's own task prompt (one channel).
- ``decoder`` — prompt-driven decoder: its input is cat(bottleneck, task prompt); five stages of transposed
  conv + skip + two conv blocks.
- ``heads`` — one 1x1x1 deep-supervision head per decoder stage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from uniseg_monai.core.errors import UsageError
from uniseg_monai.networks.blocks import DecoderStage, ModalityStems, conv_block, stage
from uniseg_monai.networks.task_ids import TaskId, as_task_ids

PAPER_FEATURES = (32, 64, 128, 256, 320, 320)
PAPER_KERNEL_SIZES = ((3, 3, 1),) + ((3, 3, 3),) * 5
PAPER_STRIDES = ((1, 1, 1), (2, 2, 1)) + ((2, 2, 2),) * 4
PAPER_PATCH_SIZE = (192, 192, 64)
PAPER_IN_CHANNELS = (1, 2, 4)
PROMPTS = ("universal", "fixed", "multiple")  # the paper's UniSeg, and its Table 4 ablations Fixed / Multiple Prompts
PAPER_VARIANT = {"prompt": "universal", "prompt_channels": 0, "prompt_at": "start"}


def nnunet_features(base: int = 32, maximum: int = 320, num_stages: int = 6) -> tuple[int, ...]:
    """nnU-Net channel plan: ``base`` doubled per stage, capped at ``maximum``."""
    return tuple(min(base * 2**s, maximum) for s in range(num_stages))


def _triple(value: Sequence[int] | int) -> tuple[int, int, int]:
    out = (value,) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(out) != 3:
        raise UsageError(f"expected 3 spatial values (x, y, z), got {value}")
    return out  # type: ignore[return-value]


class UniSegBackbone(nn.Module):
    """nnU-Net-style 3D U-Net with modality stems: UniSeg without prompt and FUSE (the downstream form).

    Args:
        num_classes: output channels of every head (incl. background).
        in_channels: channel counts that get a modality stem.
        features: channels per encoder stage, the last one being the bottleneck.
        kernel_sizes: conv kernel per stage, (x, y, z).
        strides: stride of each stage's first conv, (x, y, z); the first one must be 1.
        deep_supervision: in ``train()`` mode return the logits of every decoder stage.

    ``forward(x)``: x (B, C, X, Y, Z) with C in ``in_channels`` and X, Y, Z divisible by :attr:`total_stride`.
    Returns (B, num_classes, X, Y, Z) logits, or in training with deep supervision a list of
    ``len(features) - 1`` logit tensors, highest resolution first, each at its decoder stage's resolution.
    """

    task_prompt_channels = 0  # channels concatenated to the bottleneck before the decoder
    end_prompt_channels = 0  # channels concatenated to the last decoder stage's input (UniSeg-T)
    # the parts by state-dict key, for weight transfer (uniseg_monai.model_io.transfer):
    prompt_widened_key = "decoder.0.upsample.conv.weight"  # (F + task_prompt_channels, F', x, y, z), prompt last
    head_keys: tuple[str, ...] = ("heads.",)  # prefixes of the output heads
    prompt_keys: tuple[str, ...] = ()  # prefixes of the upstream-only parts (universal prompt, FUSE)
    __jit_unused_properties__ = ["in_channels"]  # noqa: RUF012 (TorchScript's opt-out list)

    def __init__(
        self,
        num_classes: int = 14,
        in_channels: Sequence[int] = PAPER_IN_CHANNELS,
        features: Sequence[int] = PAPER_FEATURES,
        kernel_sizes: Sequence[Sequence[int] | int] = PAPER_KERNEL_SIZES,
        strides: Sequence[Sequence[int] | int] = PAPER_STRIDES,
        deep_supervision: bool = True,
    ) -> None:
        super().__init__()
        kernels = [_triple(k) for k in kernel_sizes]
        steps = [_triple(s) for s in strides]
        if not len(features) == len(kernels) == len(steps) or len(features) < 2:
            raise UsageError(
                f"features, kernel_sizes and strides need one entry per stage (at least 2), got "
                f"{len(features)}, {len(kernels)} and {len(steps)}"
            )
        if steps[0] != (1, 1, 1):
            raise UsageError(f"stage 0 cannot be strided, got strides[0]={steps[0]}: set --strides#0 [1, 1, 1]")
        if num_classes < 1:
            raise UsageError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.deep_supervision = deep_supervision
        self.class_groups = [int(num_classes)]  # UniSeg's added classes (see there); one group: one convolution
        # constructor arguments as JSON values (a model file's ``network_def``); TorchScript skips this attribute
        self.init_args: dict = {
            "num_classes": int(num_classes),
            "in_channels": [int(c) for c in in_channels],
            "features": [int(f) for f in features],
            "kernel_sizes": [list(k) for k in kernels],
            "strides": [list(s) for s in steps],
        }
        self.total_stride = tuple(math.prod(s[a] for s in steps) for a in range(3))

        stem = ModalityStems(in_channels, features[0], kernels[0])
        first = nn.Sequential(stem, conv_block(features[0], features[0], kernels[0]))
        self.encoder = nn.ModuleList(
            [first] + [stage(features[s - 1], features[s], kernels[s], steps[s]) for s in range(1, len(features) - 1)]
        )
        self.bottleneck = stage(features[-2], features[-1], kernels[-1], steps[-1])
        self.decoder = nn.ModuleList(
            DecoderStage(
                features[s + 1] + (self.task_prompt_channels if s == len(features) - 2 else 0),
                features[s],
                kernels[s + 1],  # as nnU-Net: the decoder stage that upsamples stage s+1 uses its kernel
                steps[s + 1],
                self.end_prompt_channels if s == 0 else 0,
            )
            for s in reversed(range(len(features) - 1))
        )
        self.heads = nn.ModuleList(
            Convolution(3, features[s], num_classes, kernel_size=1, conv_only=True, bias=False)
            for s in reversed(range(len(features) - 1))
        )
        self.apply(_he_init)

    def network_def(self) -> dict:
        """The MONAI bundle config that builds this network: ``{"_target_": ..., **constructor arguments}``
        (``deep_supervision`` left out: it only changes what ``train()`` mode returns)."""
        return {"_target_": f"uniseg_monai.networks.{type(self).__name__}", **self.init_args}

    @property
    def in_channels(self) -> tuple[int, ...]:
        """Channel counts with a modality stem."""
        return self.encoder[0][0].in_channels

    @torch.jit.unused
    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError unless x is (B, C, X, Y, Z) with a stem for C and a size divisible by the stride."""
        if x.ndim != 5:
            raise ValueError(f"expected a (B, C, X, Y, Z) tensor, got shape {tuple(x.shape)}")
        if x.shape[1] not in self.in_channels:
            raise ValueError(
                f"input has {x.shape[1]} channels, but this network has modality stems for "
                f"{list(self.in_channels)} channels only (1: CT or MR, 2: CT+PET, 4: four MR sequences)"
            )
        size = tuple(x.shape[2:])
        if any(n % s for n, s in zip(size, self.total_stride)):
            raise ValueError(
                f"spatial size {size} is not divisible by the total stride {self.total_stride} (x, y, z); "
                "pad the input or choose a window size that is a multiple of it"
            )
        if all(n == s for n, s in zip(size, self.total_stride)):
            raise ValueError(
                f"spatial size {size} leaves one bottleneck voxel, where instance norm is undefined; the input "
                f"needs at least 2 voxels at the bottleneck (twice the total stride {self.total_stride} on one axis)"
            )

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x (B, C, X, Y, Z) -> (skips of stages 0..S-2, bottleneck features (B, F, X/32, Y/32, Z/16))."""
        if not torch.jit.is_scripting():
            self.check_input(x)
        skips: list[torch.Tensor] = []
        for enc_stage in self.encoder:
            x = enc_stage(x)
            skips.append(x)
        return skips, self.bottleneck(x)

    def decode(
        self,
        z: torch.Tensor,
        skips: list[torch.Tensor],
        all_heads: bool,
        end_prompt: Optional[torch.Tensor] = None,  # noqa: UP045
    ) -> list[torch.Tensor]:
        """Decoder input z -> logits, highest resolution first (all heads, or only the full-resolution one).
        ``end_prompt`` (B, E, *s): resampled (trilinear) to the last stage's resolution and concatenated to its
        input (UniSeg-T)."""
        logits: list[torch.Tensor] = []
        last = len(self.decoder) - 1
        for i, (dec_stage, head) in enumerate(zip(self.decoder, self.heads)):
            skip = skips[last - i]
            if i == last and end_prompt is not None:
                extra = F.interpolate(end_prompt, size=skip.shape[2:], mode="trilinear", align_corners=False)
                z = dec_stage(z, skip, extra)
            else:
                z = dec_stage(z, skip)
            if all_heads or i == last:
                logits.insert(0, head(z) if len(self.class_groups) < 2 else self.grouped_head(head.conv.weight, z))
        return logits

    def grouped_head(self, weight: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """A head (1x1x1 conv ``weight`` (K, C, 1, 1, 1), no bias) on z (B, C, *s) -> (B, K, *s), each group of
        :attr:`class_groups` by its own convolution: the numbers an earlier model with fewer classes computed."""
        start, out = 0, []
        for size in self.class_groups:
            out.append(F.conv3d(z, weight[start : start + size]))
            start += size
        return torch.cat(out, dim=1)

    def output(self, logits: list[torch.Tensor]) -> Union[torch.Tensor, list[torch.Tensor]]:  # noqa: UP007
        """The forward result: all deep-supervision logits when training with it, else the full-resolution one."""
        if self.training and self.deep_supervision:
            return logits
        return logits[0]

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, list[torch.Tensor]]:  # noqa: UP007
        skips, z = self.encode(x)
        return self.output(self.decode(z, skips, self.training and self.deep_supervision))


class UniSeg(UniSegBackbone):
    """UniSeg: the backbone with a universal prompt, FUSE and a prompt-driven decoder.

    Args:
        num_tasks: N, the number of tasks (universal prompt channels and FUSE outputs).
        num_classes: output channels (max classes over tasks, incl. background).
        patch_size: training window (X, Y, Z); the universal prompt has size patch_size / total stride.
        fuse_blocks: conv blocks in FUSE (paper: 3; hidden width (F + U) // 4), 1-4 in the paper's Table 8.
        prompt: ``"universal"`` (the paper: a learned universal prompt, FUSE), ``"fixed"`` (Fixed Prompt: the
            universal prompt is zeros and not learned, a buffer; FUSE kept) or ``"multiple"`` (Multiple Prompts: the
            N channels of the learned prompt tensor are the task prompts themselves; no FUSE).
        prompt_channels: U, the universal prompt's channels (0: N, the paper's; Table 8 tries N, 2N, 4N, C = the
            bottleneck's channels). FUSE maps cat(bottleneck, prompt) with F + U channels to N task prompts.
        prompt_at: ``"start"`` (the paper: the task prompt is concatenated to the bottleneck, the decoder's input)
            or ``"end"`` (UniSeg-T: the decoder runs on the bottleneck alone and the task prompt, resampled to full
            resolution, joins the input of the last decoder stage, so only that stage and its head see the task).
        added_tasks: A, how many of the ``num_tasks`` were added to a trained model (``uniseg add-task``; 0 for the
            paper's). The first N - A tasks keep the trained FUSE, which reads the first U - A prompt channels;
            added task a gets its own prompt channel U - A + a and FUSE filter ``task_extensions[a]`` (a conv block
            over the input of FUSE's last block and that channel); Multiple Prompts: its own prompt channel.
        class_groups: the heads' output channels as groups computed by separate convolutions (sizes summing to
            ``num_classes``, e.g. [4, 2] after a task with 6 classes was added to a 4-class model; [] one group).
            Together with ``added_tasks`` this keeps every earlier task's numbers bit-identical.
        other arguments: as :class:`UniSegBackbone`.

    ``forward(x, task_id)``: x (B, C, X, Y, Z); task_id one id (whole batch), a sequence of B ints or a (B,)
    tensor — every sample is decoded with its own task. Output as :class:`UniSegBackbone`.

    Window sizes: at ``patch_size`` the universal prompt is used as is (the official behaviour). For any other
    size divisible by the total stride it is resampled to the bottleneck size with trilinear interpolation
    (``align_corners=False``), so sliding windows of any admissible size work.
    """

    task_prompt_channels = 1
    prompt_keys = ("universal_prompt", "fuse.", "task_extensions.")

    def __init__(
        self,
        num_tasks: int = 11,
        num_classes: int = 4,
        patch_size: Sequence[int] = PAPER_PATCH_SIZE,
        in_channels: Sequence[int] = PAPER_IN_CHANNELS,
        features: Sequence[int] = PAPER_FEATURES,
        kernel_sizes: Sequence[Sequence[int] | int] = PAPER_KERNEL_SIZES,
        strides: Sequence[Sequence[int] | int] = PAPER_STRIDES,
        fuse_blocks: int = 3,
        deep_supervision: bool = True,
        prompt: str = "universal",
        prompt_channels: int = 0,
        prompt_at: str = "start",
        added_tasks: int = 0,
        class_groups: Sequence[int] = (),
    ) -> None:
        if num_tasks < 1:
            raise UsageError(f"num_tasks must be >= 1, got {num_tasks}: the datalist names no task")
        if fuse_blocks < 1:
            raise UsageError(f"fuse_blocks must be >= 1, got {fuse_blocks}")
        if prompt not in PROMPTS or prompt_at not in ("start", "end") or prompt_channels < 0:
            raise UsageError(
                f"prompt must be one of {PROMPTS}, prompt_at 'start' or 'end' and prompt_channels >= 0 (0: the "
                f"number of tasks); got {prompt!r}, {prompt_at!r}, {prompt_channels}"
            )
        groups_ok = not class_groups or (sum(class_groups) == num_classes and min(class_groups) >= 1)
        if not 0 <= added_tasks < num_tasks or not groups_ok:
            raise UsageError(
                f"added_tasks must be in [0, num_tasks) and class_groups positive sizes summing to num_classes; got "
                f"{added_tasks} of {num_tasks} tasks and {list(class_groups)} for {num_classes} classes"
            )
        trained_tasks = num_tasks - added_tasks
        width = prompt_channels or trained_tasks  # the trained FUSE's prompt channels
        if prompt == "multiple" and width != trained_tasks:
            raise UsageError(f"prompt 'multiple' has one prompt per task: prompt_channels must be 0, got {width}")
        self.task_prompt_channels = 1 if prompt_at == "start" else 0
        self.end_prompt_channels = 1 - self.task_prompt_channels
        super().__init__(num_classes, in_channels, features, kernel_sizes, strides, deep_supervision)
        self.num_tasks = num_tasks
        self.prompt, self.prompt_position = prompt, prompt_at
        patch = _triple(patch_size)
        self.init_args = {"num_tasks": int(num_tasks), **self.init_args, "patch_size": list(patch)}
        self.init_args["fuse_blocks"] = int(fuse_blocks)
        variant = {"prompt": prompt, "prompt_channels": int(prompt_channels), "prompt_at": prompt_at}
        self.init_args.update({k: v for k, v in variant.items() if v != PAPER_VARIANT[k]})  # the paper's: no keys
        if added_tasks:
            self.init_args["added_tasks"] = int(added_tasks)
        if class_groups:
            self.init_args["class_groups"] = [int(c) for c in class_groups]
        self.class_groups = [int(c) for c in class_groups] or [int(num_classes)]
        self.fuse_prompt_channels = width
        if any(p % s for p, s in zip(patch, self.total_stride)):
            fit = tuple(-(-p // s) * s for p, s in zip(patch, self.total_stride))
            raise UsageError(
                f"patch_size {patch} is not divisible by the network's total stride {self.total_stride}: set "
                f"--patch_size to multiples of it, e.g. {list(fit)}"
            )
        prompt_size = tuple(p // s for p, s in zip(patch, self.total_stride))
        if prompt == "fixed":
            self.register_buffer("universal_prompt", torch.zeros(1, width + added_tasks, *prompt_size))
        else:
            self.universal_prompt = nn.Parameter(torch.randn(1, width + added_tasks, *prompt_size))
        hidden = (features[-1] + width) // 4
        ins = [features[-1] + width] + [hidden] * (fuse_blocks - 1)
        outs = [hidden] * (fuse_blocks - 1) + [trained_tasks]
        blocks = [conv_block(i, o, 3) for i, o in zip(ins, outs)] if prompt != "multiple" else [nn.Identity()]
        self.fuse = nn.Sequential(*blocks)
        extensions = [conv_block(ins[-1] + 1, 1, 3) for _ in range(added_tasks)] if prompt != "multiple" else []
        self.task_extensions = nn.ModuleList(extensions)
        self.fuse.apply(_he_init)
        self.task_extensions.apply(_he_init)

    def task_ids(self, task_id: torch.Tensor, batch_size: int) -> torch.Tensor:
        """``task_id`` (one id for the batch, B ints or a tensor) as a (B,) long tensor on the prompt's device,
        checked by :func:`~uniseg_monai.networks.task_ids.as_task_ids` in eager mode only."""
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            return task_id.long().flatten().expand(batch_size)  # (1,) or (B,); checked in eager mode only
        return self._checked_task_ids(task_id, batch_size)

    @torch.jit.unused
    def _checked_task_ids(self, task_id: TaskId, batch_size: int) -> torch.Tensor:
        return as_task_ids(task_id, batch_size, self.num_tasks, self.universal_prompt.device)

    def prompt_at(self, size: list[int]) -> torch.Tensor:
        """The universal prompt (1, N, *size): as learned at the training size, trilinearly resampled otherwise.
        While tracing (ONNX export) it is always resampled, which is exact at the training size, so the traced
        graph serves every window size."""
        if list(size) == list(self.universal_prompt.shape[2:]) and not torch.jit.is_tracing():
            return self.universal_prompt
        if len(self.task_extensions) == 0:
            return F.interpolate(self.universal_prompt, size=list(size), mode="trilinear", align_corners=False)
        parts = self.universal_prompt.split([self.fuse_prompt_channels, len(self.task_extensions)], dim=1)
        return torch.cat([F.interpolate(p, size=list(size), mode="trilinear", align_corners=False) for p in parts], 1)

    def task_prompts(self, z: torch.Tensor) -> torch.Tensor:
        """FUSE: bottleneck features (B, F, *s) -> task prompts (B, N, *s); independent of the task. Multiple
        Prompts: the learned per-task prompts themselves."""
        prompt = self.prompt_at(z.shape[2:]).expand(z.shape[0], -1, -1, -1, -1)
        if self.prompt == "multiple":
            return prompt
        width = self.fuse_prompt_channels
        x = torch.cat([z, prompt[:, :width]], dim=1)
        if len(self.task_extensions) == 0:
            return self.fuse(x)
        last = len(self.fuse) - 1
        prompts: list[torch.Tensor] = []
        for i, block in enumerate(self.fuse):
            if i < last:
                x = block(x)
            else:
                prompts.append(block(x))  # x: the last block's input, which the added filters read too
        for a, extension in enumerate(self.task_extensions):
            prompts.append(extension(torch.cat([x, prompt[:, width + a : width + a + 1]], dim=1)))
        return torch.cat(prompts, dim=1)

    def decode_task(
        self, z: torch.Tensor, skips: list[torch.Tensor], task_prompt: torch.Tensor, all_heads: bool
    ) -> list[torch.Tensor]:
        """The decoder driven by each sample's task prompt (B, 1, *s), entering where ``prompt_at`` says."""
        if self.prompt_position == "start":
            return self.decode(torch.cat([z, task_prompt], dim=1), skips, all_heads)
        return self.decode(z, skips, all_heads, task_prompt)

    @staticmethod
    def select_task_prompt(task_prompts: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Each sample's own task prompt: (B, N, *s) and (B,) ids -> (B, 1, *s)."""
        size = task_prompts.shape
        index = task_ids.to(task_prompts.device).view(-1, 1, 1, 1, 1).expand(-1, 1, size[2], size[3], size[4])
        return torch.gather(task_prompts, 1, index)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, task_id: torch.Tensor
    ) -> Union[torch.Tensor, list[torch.Tensor]]:  # noqa: UP007
        ids = self.task_ids(task_id, x.shape[0])
        skips, z = self.encode(x)
        task_prompt = self.select_task_prompt(self.task_prompts(z), ids)
        return self.output(self.decode_task(z, skips, task_prompt, self.training and self.deep_supervision))

    @torch.jit.unused
    def full_resolution_head(self, z: torch.Tensor) -> torch.Tensor:
        """The last decoder stage's head (by :attr:`class_groups` when set): (B, F, X, Y, Z) -> (B, K, X, Y, Z)."""
        head = self.heads[len(self.heads) - 1]
        return head(z) if len(self.class_groups) < 2 else self.grouped_head(head.conv.weight, z)

    @torch.jit.unused
    def forward_tasks(self, x: torch.Tensor, task_ids: Sequence[int]) -> torch.Tensor:
        """All-task inference: encoder and FUSE once, then the decoder once per task in ``task_ids``, one task
        after the other, so memory does not grow with the number of tasks (batching the tasks through the decoder
        was slower and took more memory: ``benchmarks/all_task_decoding.py``), and what does not
        depend on the task once: each decoder stage's convolution of its skip (a third of the decoder's
        multiply-accumulates) and, with ``prompt_at`` ``end``, every stage but the last. Equals ``forward(x, t)``
        for each t (to float rounding). x (B, C, X, Y, Z), T task ids -> full-resolution logits (B, T, K, X, Y, Z).
        """
        ids = self._checked_task_ids(list(task_ids), len(task_ids))
        skips, z = self.encode(x)
        prompts = self.task_prompts(z).index_select(1, ids)  # (B, T, *s)
        last, logits = len(self.decoder) - 1, []
        if self.prompt_position == "end":  # only the last stage sees the task
            for i, stage in enumerate(self.decoder[:-1]):
                z = stage(z, skips[last - i])
            stage = self.decoder[last]
            shared = stage.first_conv(0, stage.upsample(z)) + stage.first_conv(1, skips[0], bias=True)
            size = skips[0].shape[2:]
            for t in range(ids.numel()):
                end = F.interpolate(prompts[:, t : t + 1], size=size, mode="trilinear", align_corners=False)
                h = stage.after_first_conv(shared + stage.first_conv(2, end))
                logits.append(self.full_resolution_head(h))
            return torch.stack(logits, dim=1)
        shared = [stage.first_conv(1, skips[last - i], bias=True) for i, stage in enumerate(self.decoder)]
        for t in range(ids.numel()):
            h = torch.cat([z, prompts[:, t : t + 1]], dim=1)
            for stage, response in zip(self.decoder, shared):
                h = stage.after_first_conv(stage.first_conv(0, stage.upsample(h)) + response)
            logits.append(self.full_resolution_head(h))
        return torch.stack(logits, dim=1)


def _he_init(module: nn.Module) -> None:
    """nnU-Net's initialisation: He normal (a=0.01) on (transposed) convs, zero biases."""
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=0.01)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
