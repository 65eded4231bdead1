"""The NLayer PatchGAN discriminator (Isola et al. 2017) of the latent-diffusion autoencoder recipe.

``PatchDiscriminator(in_channels, channels=64, layers=3)`` maps ``[B, C, H, W]`` images in
[-1, 1] to a map of real/fake logits, one per overlapping patch (a 70x70 receptive field
at 3 layers), as CompVis latent-diffusion's ``NLayerDiscriminator``.

Normalisation: GroupNorm, not BatchNorm. BatchNorm's batch statistics depend on how the
global batch is split over ranks and micro-batches (a run at 8 ranks would train another
function than the same run at 2), they mix real and fake images when both go through one
forward, and SyncBatchNorm would add a collective per layer and per forward on top.
GroupNorm normalises each image alone: the discriminator computes the same function at
any world size, accumulation or ZeRO stage, with no communication.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class PatchDiscriminator(nn.Module):
    """NLayer PatchGAN: ``layers`` stride-2 4x4 convs (widths doubling up to 8x), one stride-1 conv, a logit conv."""

    def __init__(self, in_channels: int, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        body: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2**n, 8)
            stride = 2 if n < layers else 1
            body += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False), _norm(out), nn.LeakyReLU(0.2)]
            width = out
        body.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*body)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The pix2pix/LDM initialisation: conv weights N(0, 0.02), norm scales N(1, 0.02), biases 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch logits ``[B, 1, h, w]`` (positive = judged real)."""
        return self.main(x.to(self.main[0].weight.dtype))
