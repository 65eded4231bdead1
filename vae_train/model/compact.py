"""The compact encoder/decoder (``model.arch: compact``): plain convolutions and a global latent vector.

Why a second family next to the ResNet stages: the importance-weighted bound
decodes K (1,000) latents per image, so the decoder's cost per pass decides how
long an IWAE evaluation takes, and on a 2-core machine the ResNet decoder (GroupNorm,
two 3x3 convolutions per block at every resolution) costs ~1 ms per pass. This
decoder is a linear layer and one transposed convolution per resolution, a few
MFLOPs; the encoder runs once per image and may be wider.

The latent is a vector of ``latent_channels`` units, stored as ``[B, C, 1, 1]``
so the reparameterization/KL op, free bits per channel and the active-units
statistic treat each unit as a channel, unchanged. A global latent also avoids the
posterior collapse of the spatial map on Fashion-MNIST (most of its 196 units
went inactive), and it is the latent structure of the published VAE results the
default job is compared with.

Shapes for ``channel_mult = [m0, ..., m_{L-1}]`` and widths ``w_i = base_channels * m_i``:
the encoder applies ``L-1`` stride-2 4x4 convolutions (``in -> w0 -> ... -> w_{L-2}``,
halving the side each time), a 3x3 convolution to ``w_{L-1}`` at the lowest
resolution, then a linear layer to ``2 * latent_channels`` (mean, log-variance). The
decoder mirrors it: linear to ``w_{L-1}`` maps at the lowest resolution, then
``L-1`` stride-2 4x4 transposed convolutions back up (``w_{L-1} -> w_{L-3} ... ->
out``), skipping ``w_0`` so the full-resolution layer is the thin output layer.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from vae_train.config import ModelConfig


def _widths(cfg: ModelConfig) -> list[int]:
    return [cfg.base_channels * mult for mult in cfg.channel_mult]


class CompactEncoder(nn.Module):
    """Image ``[B, C, H, W]`` -> (mean, log-variance) ``[B, latent_channels, 1, 1]`` each; ``grid`` is
    (H, W) over the downsampling factor (the fully-connected layer fixes the image size)."""

    def __init__(self, cfg: ModelConfig, grid: tuple[int, int]) -> None:
        super().__init__()
        widths = _widths(cfg)
        layers: list[nn.Module] = []
        width = cfg.in_channels
        for out_width in widths[:-1]:
            layers += [nn.Conv2d(width, out_width, kernel_size=4, stride=2, padding=1), nn.SiLU()]
            width = out_width
        layers += [nn.Conv2d(width, widths[-1], kernel_size=3, padding=1), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(widths[-1] * grid[0] * grid[1], 2 * cfg.latent_channels)

    @property
    def conv_in(self) -> nn.Conv2d:
        """The first layer (its weight dtype is the one the model casts inputs to, as for the ResNet encoder)."""
        return self.body[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc(self.dropout(self.body(x).flatten(1)))
        mu, logvar = h[..., None, None].chunk(2, dim=1)
        return mu, logvar


class CompactDecoder(nn.Module):
    """Latent ``[B, latent_channels, 1, 1]`` -> likelihood parameters ``[B, out_channels, H, W]``."""

    def __init__(self, cfg: ModelConfig, out_channels: int, grid: tuple[int, int]) -> None:
        super().__init__()
        widths = _widths(cfg)
        self.grid = grid
        self.fc = nn.Linear(cfg.latent_channels, widths[-1] * grid[0] * grid[1])
        ups: list[nn.Module] = []
        width = widths[-1]
        if len(widths) == 1:  # a single resolution: no upsampling, a 3x3 output convolution
            ups.append(nn.Conv2d(width, out_channels, kernel_size=3, padding=1))
        targets = list(reversed(widths[1:-1])) + [out_channels] if len(widths) > 1 else []
        for i, out_width in enumerate(targets):
            if i:
                ups.append(nn.SiLU())
            ups.append(nn.ConvTranspose2d(width, out_width, kernel_size=4, stride=2, padding=1))
            width = out_width
        self.body = nn.Sequential(*ups)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.fc(z.flatten(1)))
        return self.body(h.view(z.shape[0], -1, *self.grid))
