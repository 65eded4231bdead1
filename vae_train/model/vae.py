"""The convolutional VAE: LDM-style encoder and decoder around a diagonal-Gaussian latent map.

Usage (no training machinery needed)::

    from vae_train.config import ModelConfig
    from vae_train.model import ConvVAE, vae_loss

    model = ConvVAE(ModelConfig(image_size=28, in_channels=1, likelihood="bernoulli"))
    out = model(x)                                  # x: [B, 1, 28, 28] in model.likelihood.value_range
    terms = vae_loss(out, beta=1.0, free_bits=0.0)  # terms.loss.backward()
    images = model.sample(64, temperature=0.8)

``forward`` returns the ELBO terms themselves (reconstruction NLL and KL per
image, KL per latent channel), so the trainer, the evaluator and the logger
never re-derive them and cannot disagree about them.

Image sizes: the encoder halves the resolution ``len(channel_mult) - 1`` times,
so the network needs a multiple of ``2^(len(channel_mult)-1)``. For other sizes
(28x28 with three halvings) ``model.size_mode`` decides: ``pad`` pads the input
with the data range's low value (the background) and crops the decoder output
back, so the likelihood covers exactly the real pixels; ``crop`` centre-crops
the input to the largest multiple, so the model describes the cropped image;
``error`` refuses at construction. Nothing is ever silently misaligned.
``image_size`` may be ``[H, W]`` (each side resolved on its own), and any other
``H x W`` divisible by the factor is taken as it is -- the network is fully
convolutional -- which is what aspect-ratio buckets and larger evaluation images use.

Memory (``model.gradient_checkpointing``, ``model.channels_last``, ``model.compile``,
and :meth:`ConvVAE.enable_tiling` for images larger than the training size) changes
how the same function is computed, never the parameters' names: checkpoints and
exports are interchangeable across these settings.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn
from torch.nn import functional as F

from vae_train.config import ModelConfig
from vae_train.model.activation_checkpointing import enable_gradient_checkpointing
from vae_train.model.autoregressive import LocalAutoregressive, add_context, sample_autoregressive
from vae_train.model.blocks import Downsample, ResBlock, Upsample, group_norm
from vae_train.model.compact import CompactDecoder, CompactEncoder
from vae_train.model.errors import ArchitectureError, InputShapeError, ModelError
from vae_train.model.likelihoods import Likelihood, build_likelihood
from vae_train.model.tiling import tiled_apply
from vae_train.ops import reparam_kl


@dataclass
class VAEOutput:
    """Everything one forward pass produces; all per-image terms are float32 nats.

    Attributes:
        recon_nll: ``-log p(x|z)`` per image, ``[B]``.
        kl: ``KL(q(z|x) || N(0, I))`` per image, ``[B]``.
        kl_per_channel: KL per image and latent channel (summed over positions), ``[B, latent_channels]``.
        z: the reparameterized latent sample, ``[B, *model.latent_shape]``.
        mu, logvar: the encoder's posterior mean and raw log-variance maps (same shape as
            ``z``); the posterior variance is ``exp(vae_train.ops.reference.soft_clamp_logvar(logvar))``,
            the clamp the reparameterization op applies.
        x_params: the decoder output the likelihood reads, cropped to the image the model describes.
    """

    recon_nll: torch.Tensor
    kl: torch.Tensor
    kl_per_channel: torch.Tensor
    z: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    x_params: torch.Tensor

    @property
    def nelbo(self) -> torch.Tensor:
        """Negative ELBO per image, ``recon_nll + kl`` (nats), ``[B]``."""
        return self.recon_nll + self.kl


def elbo_terms(mu: torch.Tensor, logvar: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor],
               likelihood: Likelihood, target: torch.Tensor, *, reparam: str,
               generator: torch.Generator | None = None) -> VAEOutput:
    """One-sample ELBO terms from the posterior moments, for every architecture's ``forward``.

    ``z`` and the KL (also per channel) come from the fused op (``model.reparam``),
    ``decode(z)`` gives the likelihood's parameters, and ``target`` is scored under them:
    one place, so the terms the trainer logs mean the same for ``convvae``/``compact``
    and ``ldm``.
    """
    z, kl, kl_per_channel = reparam_kl(mu, logvar, generator=generator, return_per_channel=True, impl=reparam)
    params = decode(z)
    return VAEOutput(
        recon_nll=-likelihood.log_prob(target, params),
        kl=kl.float(),
        kl_per_channel=kl_per_channel.float(),
        z=z,
        mu=mu,
        logvar=logvar,
        x_params=params,
    )


def prior_draw(n: int, latent_shape: tuple[int, ...], temperature: float, device: torch.device,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` latents from the prior ``N(0, temperature^2 I)`` (``sample`` of every architecture)."""
    if n < 1 or temperature < 0:
        raise ValueError(f"sample needs n >= 1 and temperature >= 0, got n={n}, temperature={temperature}")
    return torch.randn((n, *latent_shape), generator=generator, device=device) * temperature


def check_layout(x: object, in_channels: int, expected: str) -> None:
    """Reject anything but a 4-D tensor with ``in_channels`` channels (``expected`` names the shape taken)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputShapeError(f"the model takes image batches of shape {expected}, got {shape}")
    if x.shape[1] != in_channels:
        raise InputShapeError(
            f"images have {x.shape[1]} channels but the model was built for model.in_channels="
            f"{in_channels}; set model.in_channels={x.shape[1]} or convert the images"
        )


def check_pixels(x: torch.Tensor, likelihood: Likelihood, check_range: bool = True) -> None:
    """Reject integer or empty batches and (``check_range``) pixels the likelihood cannot score.

    The range check is one ``aminmax`` whose result the host must read: a device sync,
    so a caller whose data is in range by construction may skip it.
    """
    if not x.is_floating_point():
        raise InputShapeError(
            f"images have dtype {x.dtype}; the model takes floating-point pixels in "
            f"{likelihood.value_range} (scale 8-bit images first)"
        )
    if x.numel() == 0:
        raise InputShapeError("the image batch is empty")
    if not check_range:
        return
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputShapeError("the image batch holds NaN or infinite pixel values; check the data source")
    likelihood.check_range(lo, hi)


@dataclass(frozen=True)
class _Geometry:
    """How the configured image maps onto the network's input grid, per side (height, width)."""

    network: tuple[int, int]  # what the encoder sees
    output: tuple[int, int]  # the image the likelihood scores
    offset: tuple[int, int]  # pad (pad mode) or crop (crop mode) before the image, in pixels


def _side(size: int, factor: int, cfg: ModelConfig) -> tuple[int, int, int]:
    """(network, output, offset) of one side of ``image_size`` under ``size_mode``, or raise."""
    if size % factor == 0:
        return size, size, 0
    shown = cfg.image_size if isinstance(cfg.image_size, int) else list(cfg.image_size)
    fix = (
        f"set model.size_mode=pad (pad to {math.ceil(size / factor) * factor}) or crop, use "
        f"fewer resolutions in model.channel_mult, or an image_size divisible by {factor}"
    )
    if cfg.size_mode == "error":
        raise ArchitectureError(
            f"model.image_size={shown} is not divisible by the downsampling factor {factor} "
            f"(2^(len(model.channel_mult)-1) with channel_mult={cfg.channel_mult}); {fix}"
        )
    if cfg.size_mode == "pad":
        padded = math.ceil(size / factor) * factor
        return padded, size, (padded - size) // 2
    cropped = (size // factor) * factor
    if cropped == 0:
        raise ArchitectureError(
            f"model.size_mode=crop would crop model.image_size={shown} to nothing (downsampling factor "
            f"{factor}); use size_mode=pad or fewer resolutions in model.channel_mult"
        )
    return cropped, cropped, (size - cropped) // 2


def _geometry(cfg: ModelConfig) -> _Geometry:
    """Resolve ``size_mode`` for ``image_size`` (each side) and the downsampling factor, or raise."""
    (nh, oh, th), (nw, ow, tw) = (_side(side, cfg.downsampling_factor, cfg) for side in cfg.hw)
    return _Geometry((nh, nw), (oh, ow), (th, tw))


@dataclass(frozen=True)
class Tiling:
    """Tiled encode/decode settings (see :meth:`ConvVAE.enable_tiling`), in image pixels."""

    tile: tuple[int, int]
    overlap: tuple[int, int]


class Encoder(nn.Module):
    """Image -> (mean, log-variance) maps at 1/2^(levels-1) resolution."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        widths = [cfg.base_channels * mult for mult in cfg.channel_mult]
        groups = cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], kernel_size=3, padding=1)
        layers: list[nn.Module] = []
        width = widths[0]
        for level, out_width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(width, out_width, groups, cfg.dropout))
                width = out_width
            if level != len(widths) - 1:
                layers.append(Downsample(width))
        layers += [ResBlock(width, width, groups, cfg.dropout), ResBlock(width, width, groups, cfg.dropout)]
        self.body = nn.Sequential(*layers)
        self.norm_out = group_norm(width, groups)
        self.conv_out = nn.Conv2d(width, 2 * cfg.latent_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(x)))))
        # logvar is left unbounded here: the reparameterization op soft-clamps it (with
        # gradient) and defines the posterior as N(mu, exp(soft_clamp_logvar(logvar))).
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar


class Decoder(nn.Module):
    """Latent map -> likelihood parameters at the network's resolution."""

    def __init__(self, cfg: ModelConfig, out_channels: int) -> None:
        super().__init__()
        widths = [cfg.base_channels * mult for mult in cfg.channel_mult]
        groups = cfg.norm_groups
        width = widths[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, width, kernel_size=3, padding=1)
        layers: list[nn.Module] = [
            ResBlock(width, width, groups, cfg.dropout),
            ResBlock(width, width, groups, cfg.dropout),
        ]
        for level in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResBlock(width, widths[level], groups, cfg.dropout))
                width = widths[level]
            if level != 0:
                layers.append(Upsample(width))
        self.body = nn.Sequential(*layers)
        self.norm_out = group_norm(width, groups)
        self.conv_out = nn.Conv2d(width, out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(z)))))


def to_channels_last(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the layer's output in channels-last memory format (``model.channels_last``)."""
    return output.contiguous(memory_format=torch.channels_last)


def apply_memory_options(model: nn.Module, checkpointed: tuple[type[nn.Module], ...]) -> None:
    """``model.gradient_checkpointing`` (of the ``checkpointed`` block types), ``model.channels_last`` and
    ``model.compile`` on a model with ``config``, ``encoder.conv_in`` and ``decoder.conv_in`` (every architecture).

    channels_last converts activations only: the first convolution of the encoder and of the
    decoder hands on its output channels-last, and convolutions, GroupNorm, SiLU and upsampling
    keep that format, so the network runs NHWC. Converting the input instead would do nothing
    for 1-channel images (NCHW and NHWC strides coincide), and the weights stay contiguous
    because DeepSpeed views every parameter as bytes to broadcast and partition it, which a
    channels-last weight (last stride != 1) refuses.
    """
    cfg = model.config
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, checkpointed)
    if cfg.channels_last:
        for conv in (model.encoder.conv_in, model.decoder.conv_in):
            conv.register_forward_hook(to_channels_last)
    if cfg.compile:
        model.encoder.compile()
        model.decoder.compile()


class ConvVAE(nn.Module):
    """Convolutional VAE built from a :class:`~vae_train.config.ModelConfig`.

    Public interface (the trainer, evaluator and exporter rely on it):

    * ``model(x, generator=None, check_range=True) -> VAEOutput`` -- one reparameterized
      sample per image.
    * ``model.encode(x) -> (mu, logvar)``; ``model.decode(z) -> x_params``.
    * ``model.target(x)`` -- the checked input as the likelihood scores it (the centre
      crop in ``crop`` mode), so ``model.likelihood.log_prob(model.target(x), model.decode(z))``
      is ``log p(x|z)`` (used by importance sampling).
    * ``model.sample(n, temperature, generator)`` and ``model.reconstruct(x)`` -- images in
      the data range (the likelihood's mean).
    * ``model.last_decoder_layer()`` -- the decoder's output conv (the adaptive GAN weight's layer).
    * ``model.likelihood``, ``model.latent_shape`` (C, h, w), ``model.num_dims``
      (pixels x channels the likelihood scores, for bits/dim), ``model.num_parameters()``,
      ``model.config`` (the ModelConfig it was built from).
    * ``model.enable_tiling(tile, overlap)`` / ``disable_tiling()`` -- encode and decode
      larger images in blended tiles (bounded memory).

    Input sizes: ``model.image_size`` (square or ``[H, W]``) goes through ``size_mode``
    (pad/crop/error); any other ``H x W`` divisible by the downsampling factor is taken
    as it is (aspect buckets, larger images): the network is fully convolutional.
    ``latent_shape`` and ``num_dims`` describe ``image_size``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.likelihood: Likelihood = build_likelihood(cfg.likelihood, cfg.gaussian_std)
        self._geometry = _geometry(cfg)
        factor = cfg.downsampling_factor
        nh, nw = self._geometry.network
        out_channels = self.likelihood.params_per_channel * cfg.in_channels
        self._likelihood_channels = out_channels
        # the decoder's maps: the likelihood's parameters, then autoregressive_gates more groups of them
        decoded_channels = out_channels * (1 + cfg.autoregressive_gates)
        self.encoder: nn.Module
        self.decoder: nn.Module
        if cfg.arch == "compact":  # a fully-connected bottleneck: images of image_size only
            self.encoder = CompactEncoder(cfg, (nh // factor, nw // factor))
            self.decoder = CompactDecoder(cfg, decoded_channels, (nh // factor, nw // factor))
            self.latent_shape: tuple[int, int, int] = (cfg.latent_channels, 1, 1)
        else:
            self.encoder = Encoder(cfg)
            self.decoder = Decoder(cfg, decoded_channels)
            self.latent_shape = (cfg.latent_channels, nh // factor, nw // factor)
        # the local autoregressive path over the image (None: pixels independent given z)
        self.autoregressive: LocalAutoregressive | None = None
        if cfg.autoregressive_channels:
            self.autoregressive = LocalAutoregressive(
                cfg.in_channels, decoded_channels, cfg.autoregressive_channels, cfg.autoregressive_layers,
                cfg.autoregressive_kernel,
            )
        oh, ow = self._geometry.output
        self.num_dims: int = cfg.in_channels * oh * ow
        self.tiling: Tiling | None = None
        apply_memory_options(self, (ResBlock,))

    @property
    def size_mode(self) -> str:
        """How odd image sizes are handled: pad, crop or error (from the config)."""
        return self.config.size_mode

    @property
    def output_size(self) -> int | tuple[int, int]:
        """Size of the images the model scores and produces for ``image_size`` inputs (image_size unless
        cropping): an int for square images, else (height, width)."""
        oh, ow = self._geometry.output
        return oh if oh == ow and isinstance(self.config.image_size, int) else (oh, ow)

    @property
    def output_hw(self) -> tuple[int, int]:
        """(height, width) of the images the model scores and produces for ``image_size`` inputs."""
        return self._geometry.output

    def last_decoder_layer(self) -> nn.Conv2d:
        """The decoder's last layer (its output conv): where the adversarial term's adaptive weight is measured."""
        return self.decoder.conv_out

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # -- memory ---------------------------------------------------------------------

    def enable_tiling(self, tile: int | tuple[int, int] | None = None, overlap: int | tuple[int, int] | None = None
                      ) -> None:
        """Encode and decode images larger than ``tile`` in overlapping tiles, blended (see :mod:`.tiling`).

        ``tile`` defaults to the training size (``image_size`` rounded to the network's
        grid), ``overlap`` to a quarter of the tile; both in image pixels, multiples of
        the downsampling factor. Images no larger than a tile are processed whole, so
        their results do not change.
        """
        if self.config.arch == "compact" or self.autoregressive is not None:
            raise ArchitectureError("tiling needs a fully convolutional model whose pixels are independent given z "
                                    "(model.arch=convvae without model.autoregressive_channels, or ldm)")
        factor = self.config.downsampling_factor
        tile_hw = self._geometry.network if tile is None else ((tile, tile) if isinstance(tile, int) else tile)
        if overlap is None:
            overlap_hw = tuple(max(factor, side // 4 // factor * factor) for side in tile_hw)
        else:
            overlap_hw = (overlap, overlap) if isinstance(overlap, int) else overlap
        for name, pair in (("tile", tile_hw), ("overlap", overlap_hw)):
            if any(v % factor or v < 0 for v in pair):
                raise ArchitectureError(f"{name} {list(pair)} must be multiples of the downsampling factor {factor}")
        if any(o >= t for o, t in zip(overlap_hw, tile_hw)) or min(tile_hw) < factor:
            raise ArchitectureError(f"tiling needs overlap < tile, got tile {list(tile_hw)}, overlap {list(overlap_hw)}")
        self.tiling = Tiling((int(tile_hw[0]), int(tile_hw[1])), (int(overlap_hw[0]), int(overlap_hw[1])))

    def disable_tiling(self) -> None:
        """Encode and decode every image whole again."""
        self.tiling = None

    def _encode_net(self, net_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder on a prepared input, in tiles when tiling is on and the input exceeds a tile."""
        tiling = self.tiling
        if tiling is None:
            return self.encoder(net_input)

        def both(tile: torch.Tensor) -> torch.Tensor:
            return torch.cat(self.encoder(tile), dim=1)

        moments = tiled_apply(net_input, both, tiling.tile, tiling.overlap, Fraction(1, self.config.downsampling_factor))
        mu, logvar = moments.chunk(2, dim=1)
        return mu, logvar

    def _decode_net(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder, in latent tiles when tiling is on and ``z`` exceeds a tile's latent."""
        tiling = self.tiling
        if tiling is None:
            return self.decoder(z)
        factor = self.config.downsampling_factor
        tile = (tiling.tile[0] // factor, tiling.tile[1] // factor)
        overlap = (tiling.overlap[0] // factor, tiling.overlap[1] // factor)
        return tiled_apply(z, self.decoder, tile, overlap, Fraction(factor))

    # -- input handling -------------------------------------------------------------

    def _check(self, x: torch.Tensor, check_range: bool = True) -> None:
        """Reject batches of the wrong rank, channels, size or dtype, and (``check_range``) value range.

        The shape and dtype checks read only metadata; the range check is a device sync
        (:func:`check_pixels`), which :meth:`forward` lets the trainer skip.
        """
        cfg = self.config
        height, width = cfg.hw
        factor = cfg.downsampling_factor
        check_layout(x, cfg.in_channels, f"[B, {cfg.in_channels}, {height}, {width}]")
        if tuple(x.shape[2:]) != (height, width) and (x.shape[2] % factor or x.shape[3] % factor):
            raise InputShapeError(
                f"images are {x.shape[2]}x{x.shape[3]} but the model was built for model.image_size="
                f"{height}x{width} and otherwise takes sides divisible by its downsampling factor {factor}; "
                "set model.image_size, or resize/crop the data (data.resize=true)"
            )
        if cfg.arch == "compact" and tuple(x.shape[2:]) != (height, width):
            raise InputShapeError(
                f"images are {x.shape[2]}x{x.shape[3]}; model.arch=compact has a fully-connected bottleneck and takes "
                f"model.image_size={height}x{width} images only (resize/crop the data, or use model.arch=convvae)"
            )
        geo = self._geometry
        if geo.network != geo.output and tuple(x.shape[2:]) == geo.network:
            # pad mode: its latent would look like a padded image_size one, and decode(z) would crop it
            raise InputShapeError(
                f"images are {x.shape[2]}x{x.shape[3]}, the size model.size_mode=pad pads model.image_size="
                f"{height}x{width} to; the model cannot tell them from padded ones: give {height}x{width} images, "
                "or any other size divisible by the downsampling factor"
            )
        check_pixels(x, self.likelihood, check_range)

    def _prepare(self, x: torch.Tensor, check_range: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Check ``x`` once and return (network input, likelihood target).

        The network input takes the weights' dtype (bf16/fp16 models accept fp32
        batches); the target keeps
        the data's precision, so 8-bit levels stay exact. Only ``image_size`` inputs go
        through ``size_mode``; other (divisible) sizes pass as they are.
        """
        self._check(x, check_range)
        geo = self._geometry
        net_dtype = self.encoder.conv_in.weight.dtype
        if tuple(x.shape[2:]) != self.config.hw or geo.network == self.config.hw:
            return x.to(net_dtype), x
        (nh, nw), (top, left) = geo.network, geo.offset
        if self.config.size_mode == "pad":
            height, width = self.config.hw
            background = self.likelihood.value_range[0]
            padding = (left, nw - width - left, top, nh - height - top)
            return F.pad(x, padding, value=background).to(net_dtype), x
        cropped = x[:, :, top : top + nh, left : left + nw]  # crop mode
        return cropped.to(net_dtype), cropped

    def _unpad(self, params: torch.Tensor) -> torch.Tensor:
        """Drop the pad-mode padding from decoder output at the padded training size (else unchanged)."""
        geo = self._geometry
        if geo.network == geo.output or tuple(params.shape[2:]) != geo.network:
            return params
        (oh, ow), (top, left) = geo.output, geo.offset
        return params[:, :, top : top + oh, left : left + ow]

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """The checked input as the likelihood scores it (centre-cropped in crop mode)."""
        return self._prepare(x)[1]

    # -- the VAE --------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters ``(mu, logvar)`` of q(z|x), each ``[B, latent_channels, H/f, W/f]``
        (``[B, *latent_shape]`` for ``image_size`` inputs)."""
        return self._encode_net(self._prepare(x)[0])

    @property
    def is_autoregressive(self) -> bool:
        """Whether p(x|z) depends on the image's own earlier pixels (``model.autoregressive_channels``)."""
        return self.autoregressive is not None

    def context(self, target: torch.Tensor) -> torch.Tensor | None:
        """The autoregressive path's logit offsets for the likelihood target ``target`` (``None`` when
        the model has none): the part of p(x|z) that does not depend on z, computed once per image."""
        return None if self.autoregressive is None else self.autoregressive(target)

    def decode(self, z: torch.Tensor, x: torch.Tensor | None = None, *, context: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Likelihood parameters of the image ``x`` given latents ``z``.

        A latent of ``latent_shape`` decodes to the image the model describes (pad mode's
        padding dropped), other latent sizes to ``f`` times their size. An autoregressive
        model needs the image it scores: pass ``x`` (the likelihood target, as
        :meth:`target` returns it) or its precomputed :meth:`context`; ``z`` may hold
        several latents per image, ``[m * B, ...]`` sample-major (as the importance-weighted
        bound decodes them). A plain model ignores both. For images from latents alone use
        :meth:`generate`.
        """
        params = self._decode_for(z, None if x is None else tuple(x.shape[2:]))
        if self.autoregressive is None:
            return params
        if context is None:
            if x is None:
                raise ModelError(
                    "this model's decoder is autoregressive (model.autoregressive_channels > 0): p(x|z) needs the "
                    "image x it scores; call decode(z, x) or decode(z, context=model.context(x)), or "
                    "model.generate(z) to draw images"
                )
            context = self.context(x)
        return add_context(params, context, self._likelihood_channels)

    @torch.no_grad()
    def generate(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in the data range for latents ``z``: the likelihood's mean of ``decode(z)`` for a plain
        decoder; for an autoregressive one, a pixel-by-pixel draw, shown as each pixel's probability
        given its drawn past (``generator`` drives the draw)."""
        if self.autoregressive is None:
            return self.likelihood.mean(self.decode(z))
        return sample_autoregressive(self.autoregressive, self._decode_for(z, None), generator)

    def latent_shape_for(self, image_hw: tuple[int, int]) -> tuple[int, int, int]:
        """The latent shape (C, h, w) of an ``image_hw`` (H, W) input (``latent_shape`` for ``image_size``)."""
        if tuple(image_hw) == self.config.hw:
            return self.latent_shape
        factor = self.config.downsampling_factor
        return (self.config.latent_channels, image_hw[0] // factor, image_hw[1] // factor)

    def num_dims_for(self, image_hw: tuple[int, int]) -> int:
        """Pixels x channels the likelihood scores for an ``image_hw`` (H, W) input (``num_dims`` for ``image_size``)."""
        if tuple(image_hw) == self.config.hw:
            return self.num_dims
        return self.config.in_channels * image_hw[0] * image_hw[1]

    def _decode_for(self, z: torch.Tensor, image_hw: tuple[int, int] | None) -> torch.Tensor:
        """Decode ``z``; drop pad-mode padding when it came from an ``image_size`` input (or, with
        ``image_hw`` None, when ``z`` has the configured latent shape: unambiguous, because :meth:`_check`
        refuses inputs of exactly the padded size)."""
        params = self._decode_net(z)
        from_image_size = image_hw == self.config.hw if image_hw is not None else (
            tuple(z.shape[1:]) == self.latent_shape)
        return self._unpad(params) if from_image_size else params

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, check_range: bool = True
                ) -> VAEOutput:
        """One-sample ELBO terms for ``x`` (``[B, C, H, W]`` in ``likelihood.value_range``).

        ``check_range=False`` skips the pixel-range check (NaN, infinities, values
        outside the likelihood's range), which costs a host sync per call. The
        trainer checks its first batch and then skips it: its data stream decodes
        every image into the likelihood's range by construction.
        """
        net_input, target = self._prepare(x, check_range)
        mu, logvar = self._encode_net(net_input)
        return elbo_terms(mu, logvar, lambda z: self.decode(z, target), self.likelihood, target,
                          reparam=self.config.reparam, generator=generator)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` images from the prior (scaled by ``temperature``), as the likelihood's mean."""
        z = prior_draw(n, self.latent_shape, temperature, next(self.parameters()).device, generator)
        return self.generate(z, generator)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstructions: the likelihood's mean of ``decode(mu, x)`` (tiled when enabled).

        For an autoregressive decoder that is each pixel's probability given ``mu`` and
        the input's own earlier pixels (what the likelihood scores), not a free draw.
        """
        net_input, target = self._prepare(x)
        mu, _ = self._encode_net(net_input)
        return self.likelihood.mean(self.decode(mu, target))
