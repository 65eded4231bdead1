"""The AutoencoderKL of latent diffusion (LDM / Stable Diffusion / diffusers), behind ConvVAE's interface.

Why a second architecture: the published tokenizers a diffusion model is trained on
(SD's ``sd-vae-ft-mse``, SDXL's VAE, FLUX's 16-channel ``ae``) have mid-block self-attention,
1x1 ``quant_conv``/``post_quant_conv`` around the latent, downsampling by a stride-2
convolution after an asymmetric (right/bottom) zero pad, and a decoder that outputs the
image itself. ConvVAE has none of these, so it cannot hold their weights.

The module tree and parameter names are those of ``diffusers.AutoencoderKL`` (``encoder.
down_blocks.0.resnets.0.conv1.weight``, ``decoder.mid_block.attentions.0.to_q.weight``, ...),
so a diffusers state dict loads as it is and the single-file LDM layout is one key mapping
(:mod:`vae_train.model.ldm_keys`). The configuration keys carry diffusers' names
(``block_out_channels``, ``layers_per_block``, ``norm_num_groups``, ``latent_channels``,
``mid_block_add_attention``, ``use_quant_conv``, ``use_post_quant_conv``).

The interface is ConvVAE's (``forward -> VAEOutput``, ``encode -> (mu, logvar)``, ``decode``,
``target``, ``sample``, ``reconstruct``, ``likelihood``, ``latent_shape``, ``num_dims``), so every
objective, the evaluator and every ZeRO stage use it unchanged. The decoder outputs
``likelihood.params_per_channel x in_channels`` maps: with ``gaussian_fixed`` (data in [-1, 1])
that is the image, as in LDM; the diffusers export needs exactly that
(:func:`vae_train.export_diffusers.check_exportable`).

Image sizes: any ``H x W`` divisible by the downsampling factor ``2^(len(block_out_channels)-1)``
(the network is fully convolutional; the attention is over all latent positions).
``model.image_size`` sets ``latent_shape`` (what :meth:`sample` draws) and ``num_dims``.

The posterior is diffusers' ``DiagonalGaussianDistribution`` (``double_z``: the channels after
``quant_conv`` are mean and log-variance). :meth:`encode` returns the raw log-variance; diffusers
hard-clamps it to [-30, 20] and the reparameterization op soft-clamps it (identity on [-15, 5]),
so the two agree wherever a trained encoder's log-variance lives.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from vae_train.config import ModelConfig
from vae_train.model.blocks import Upsample, group_norm  # Upsample is diffusers' Upsample2D (same key: conv)
from vae_train.model.errors import ArchitectureError, InputShapeError
from vae_train.model.likelihoods import Likelihood, build_likelihood
from vae_train.model.vae import VAEOutput, apply_memory_options, check_layout, check_pixels, elbo_terms, prior_draw

class ResnetBlock(nn.Module):
    """Pre-activation ResNet block; ``conv_shortcut`` (1x1) only when the width changes (diffusers' names)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class SelfAttention(nn.Module):
    """Single-head self-attention over all positions, with a residual (the mid block's ``Attention``).

    Linear ``to_q/to_k/to_v/to_out.0`` as in diffusers (LDM files hold them as 1x1 convolutions;
    the key mapping reshapes). ``scaled_dot_product_attention`` (as diffusers' default processor):
    on a GPU its fused kernels never hold the (HW x HW) score matrix, which at 1024 px and a
    factor of 8 would be 1 GiB per image in float32, and they accumulate the softmax in float32.
    """

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # one head
        out = self.to_out[0](F.scaled_dot_product_attention(q, k, v).squeeze(1))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    """ResNet -> (attention) -> ResNet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, dropout: float, attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups, dropout) for _ in range(2)])
        self.attentions = nn.ModuleList([SelfAttention(channels, groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Halve H and W: zero-pad one row/column at the bottom/right, then a stride-2 3x3 conv (no padding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class EncoderBlock(nn.Module):
    """``layers_per_block`` ResNets, then (except at the last level) a downsampler."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, dropout: float,
                 downsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, dropout) for i in range(layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.downsamplers:
            x = down(x)
        return x


class DecoderBlock(nn.Module):
    """``layers_per_block + 1`` ResNets, then (except at the last level) an upsampler."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, dropout: float,
                 upsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, dropout) for i in range(layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for up in self.upsamplers:
            x = up(x)
        return x


class Encoder(nn.Module):
    """Image -> ``2 x latent_channels`` maps (mean and log-variance, before ``quant_conv``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        widths, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderBlock(widths[max(i - 1, 0)], width, cfg.layers_per_block, groups, cfg.dropout,
                         downsample=i != len(widths) - 1)
            for i, width in enumerate(widths)
        )
        self.mid_block = MidBlock(widths[-1], groups, cfg.dropout, cfg.mid_block_add_attention)
        self.conv_norm_out = group_norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(h))))


class Decoder(nn.Module):
    """Latent map -> ``out_channels`` maps at the image resolution."""

    def __init__(self, cfg: ModelConfig, out_channels: int) -> None:
        super().__init__()
        widths, groups = list(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], kernel_size=3, padding=1)
        self.mid_block = MidBlock(widths[0], groups, cfg.dropout, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            DecoderBlock(widths[max(i - 1, 0)], width, cfg.layers_per_block + 1, groups, cfg.dropout,
                         upsample=i != len(widths) - 1)
            for i, width in enumerate(widths)
        )
        self.conv_norm_out = group_norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class AutoencoderKL(nn.Module):
    """The LDM/diffusers AutoencoderKL built from a :class:`~vae_train.config.ModelConfig` (``arch: ldm``).

    Same public interface as :class:`~vae_train.model.ConvVAE` (see its docstring).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.arch != "ldm":
            raise ArchitectureError(f"AutoencoderKL is model.arch=ldm, got model.arch={cfg.arch}")
        self.config = cfg
        self.likelihood: Likelihood = build_likelihood(cfg.likelihood, cfg.gaussian_std)
        self.factor = cfg.downsampling_factor
        height, width = cfg.hw
        if height % self.factor or width % self.factor:  # the config refuses it too; a hand-built one may not
            raise ArchitectureError(f"model.image_size={cfg.image_size} is not divisible by the downsampling "
                                    f"factor {self.factor}")
        latent = cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg, self.likelihood.params_per_channel * cfg.in_channels)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, kernel_size=1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, kernel_size=1) if cfg.use_post_quant_conv else None
        self.latent_shape: tuple[int, int, int] = self.latent_shape_for(cfg.hw)
        self.num_dims: int = self.num_dims_for(cfg.hw)
        apply_memory_options(self, (ResnetBlock, SelfAttention))

    @property
    def output_size(self) -> int | tuple[int, int]:
        """Size of the images :meth:`sample` produces (``model.image_size``: an int when square)."""
        return self.config.image_size if isinstance(self.config.image_size, int) else self.config.hw

    @property
    def output_hw(self) -> tuple[int, int]:
        """(height, width) of the images :meth:`sample` produces."""
        return self.config.hw

    def latent_shape_for(self, image_hw: tuple[int, int]) -> tuple[int, int, int]:
        """The latent shape (C, h, w) of an ``image_hw`` (H, W) input."""
        return (self.config.latent_channels, image_hw[0] // self.factor, image_hw[1] // self.factor)

    def num_dims_for(self, image_hw: tuple[int, int]) -> int:
        """Pixels x channels the likelihood scores for an ``image_hw`` (H, W) input."""
        return self.config.in_channels * image_hw[0] * image_hw[1]

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def last_decoder_layer(self) -> nn.Conv2d:
        """The decoder's output conv: where an adversarial term's adaptive weight is measured (as in LDM)."""
        return self.decoder.conv_out

    def _check(self, x: torch.Tensor, check_range: bool = True) -> None:
        """Reject batches of the wrong rank, channels, size (not divisible by the factor) or dtype, and range."""
        check_layout(x, self.config.in_channels, f"[B, {self.config.in_channels}, H, W]")
        if x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise InputShapeError(
                f"images are {x.shape[2]}x{x.shape[3]}; model.arch=ldm needs height and width divisible by its "
                f"downsampling factor {self.factor} (2^(len(block_out_channels)-1)): crop or resize them"
            )
        check_pixels(x, self.likelihood, check_range)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """The checked input as the likelihood scores it (the whole image: no padding or cropping here)."""
        self._check(x)
        return x

    def _moments(self, net_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(net_input)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters ``(mu, logvar)`` of q(z|x), each ``[B, latent_channels, H/f, W/f]``."""
        self._check(x)
        return self._moments(x.to(self.encoder.conv_in.weight.dtype))

    def decode(self, z: torch.Tensor, x: torch.Tensor | None = None, *, context: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Likelihood parameters (with ``gaussian_fixed``: the image) for latents ``z``.

        ``x``/``context`` are the image an autoregressive decoder would condition on (the
        shared signature); this decoder's pixels are independent given ``z``, so it ignores them.
        """
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    is_autoregressive = False  # p(x|z) never depends on the image's own pixels here

    def context(self, target: torch.Tensor) -> None:
        """No autoregressive path: nothing of p(x|z) depends on the image itself."""
        return None

    @torch.no_grad()
    def generate(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in the data range for latents ``z`` (the likelihood's mean; ``generator`` unused)."""
        return self.likelihood.mean(self.decode(z))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, check_range: bool = True
                ) -> VAEOutput:
        """One-sample ELBO terms for ``x`` (``[B, C, H, W]`` in ``likelihood.value_range``); see ConvVAE.forward."""
        self._check(x, check_range)
        mu, logvar = self._moments(x.to(self.encoder.conv_in.weight.dtype))
        return elbo_terms(mu, logvar, self.decode, self.likelihood, x, reparam=self.config.reparam,
                          generator=generator)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` images of ``model.image_size`` from the prior (scaled by ``temperature``), as the likelihood's mean."""
        z = prior_draw(n, self.latent_shape, temperature, next(self.parameters()).device, generator)
        return self.generate(z.to(self.encoder.conv_in.weight.dtype))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstructions: the likelihood's mean of ``decode(mu)``."""
        mu, _ = self.encode(x)
        return self.likelihood.mean(self.decode(mu))
