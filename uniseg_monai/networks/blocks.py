"""Building blocks of the UniSeg U-Net, composed from MONAI's ``Convolution`` and ``ADN``.

Every block follows nnU-Net's conv block: Conv3d (bias) -> InstanceNorm3d (affine, eps 1e-5, no running
stats) -> LeakyReLU(0.01). Spatial axes are MONAI's (x, y, z).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from monai.networks.blocks import ADN, Convolution
from torch import nn

NORM = ("instance", {"affine": True, "eps": 1e-5})
ACT = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})


def conv_block(
    in_channels: int, out_channels: int, kernel_size: Sequence[int] | int = 3, stride: Sequence[int] | int = 1
) -> Convolution:
    """One nnU-Net conv block: conv (same padding) -> InstanceNorm -> LeakyReLU. (B, Cin, ...) -> (B, Cout, ...)."""
    return Convolution(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        strides=stride,
        kernel_size=kernel_size,
        act=ACT,
        norm=NORM,
        bias=True,
    )


def stage(
    in_channels: int, out_channels: int, kernel_size: Sequence[int] | int, stride: Sequence[int] | int
) -> nn.Sequential:
    """Two conv blocks; the first one carries the stage's stride."""
    return nn.Sequential(
        conv_block(in_channels, out_channels, kernel_size, stride),
        conv_block(out_channels, out_channels, kernel_size),
    )


class ModalityStems(nn.Module):
    """The first conv of stage 0, once per supported input-channel count, sharing one norm + activation.

    ``convs[str(C)]`` maps (B, C, X, Y, Z) -> (B, F, X, Y, Z); the stem is chosen by C, so CT/MR (1 channel),
    CT+PET (2) and the four BraTS MR sequences (4) each get their own first-layer filters.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, kernel_size: Sequence[int] | int) -> None:
        super().__init__()
        if not in_channels or len(set(in_channels)) != len(in_channels) or min(in_channels) < 1:
            raise ValueError(f"in_channels must be distinct positive channel counts, got {list(in_channels)}")
        self.in_channels = tuple(int(c) for c in in_channels)
        self.convs = nn.ModuleDict(
            {
                str(c): Convolution(3, c, out_channels, kernel_size=kernel_size, conv_only=True, bias=True)
                for c in self.in_channels
            }
        )
        self.adn = ADN(ordering="NA", in_channels=out_channels, act=ACT, norm=NORM, norm_dim=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for channels, conv in self.convs.items():  # a loop rather than convs[str(C)], so TorchScript compiles it
            if int(channels) == x.shape[1]:
                return self.adn(conv(x))
        raise ValueError(
            f"input has {x.shape[1]} channels, but this network has modality stems for {list(self.in_channels)} "
            "channels only (1: CT or MR, 2: CT+PET, 4: four MR sequences)"
        )


class DecoderStage(nn.Module):
    """Transposed conv (kernel = stride, no bias) -> concat with the encoder skip (and ``extra`` channels, e.g. a
    task prompt injected here) -> two conv blocks.

    (B, Cin, s), skip (B, C, s * stride) and extra (B, E, s * stride) -> (B, C, s * stride).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int] | int,
        upsample_factor: Sequence[int] | int,
        extra_channels: int = 0,
    ) -> None:
        super().__init__()
        self.upsample = Convolution(
            3,
            in_channels,
            out_channels,
            strides=upsample_factor,
            kernel_size=upsample_factor,
            padding=0,
            output_padding=0,
            conv_only=True,
            is_transposed=True,
            bias=False,
        )
        self.blocks = nn.Sequential(
            conv_block(2 * out_channels + extra_channels, out_channels, kernel_size),
            conv_block(out_channels, out_channels, kernel_size),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor, extra: Optional[torch.Tensor] = None) -> torch.Tensor:  # noqa: UP045
        if extra is None:
            return self.blocks(torch.cat([self.upsample(x), skip], dim=1))
        return self.blocks(torch.cat([self.upsample(x), skip, extra], dim=1))

    @torch.jit.unused
    def first_conv(self, part: int, x: torch.Tensor, bias: bool = False) -> torch.Tensor:
        """The first conv block's convolution of one part of its input: 0 the upsampled input, 1 the skip, 2 the
        extra channels; (B, channels of the part, s) -> (B, C, s). The convolution is linear, so the parts'
        responses (one of them with the bias) sum to the response to their concatenation: a part that several
        decoder inputs share (the skip, for every task) is convolved once."""
        conv = self.blocks[0].conv
        c = conv.out_channels
        start, stop = (0, c, 2 * c, conv.in_channels)[part : part + 2]
        return F.conv3d(x, conv.weight[:, start:stop], conv.bias if bias else None, conv.stride, conv.padding)

    @torch.jit.unused
    def after_first_conv(self, response: torch.Tensor) -> torch.Tensor:
        """The stage from the first conv block's convolution on: its norm and activation, the second block."""
        return self.blocks[1](self.blocks[0].adn(response))
