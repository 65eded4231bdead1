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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from vae_train.config import ModelConfig
from vae_train.model.autoregressive import LocalAutoregressive, add_context, sample_autoregressive
from vae_train.model.blocks import Downsample, ResBlock, Upsample, group_norm
from vae_train.model.compact import CompactDecoder, CompactEncoder
from vae_train.model.errors import ArchitectureError, InputShapeError, ModelError
from vae_train.model.likelihoods import Likelihood, build_likelihood
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


@dataclass(frozen=True)
class _Geometry:
    """How the configured image maps onto the network's input grid."""

    network_size: int  # side of the square the encoder sees
    output_size: int  # side of the image the likelihood scores
    offset: int  # pad (pad mode) or crop (crop mode) before the image, in pixels


def _geometry(cfg: ModelConfig) -> _Geometry:
    """Resolve ``size_mode`` for ``image_size`` and the downsampling factor, or raise."""
    factor = 2 ** (len(cfg.channel_mult) - 1)
    size = cfg.image_size
    if size % factor == 0:
        return _Geometry(size, size, 0)
    fix = (
        f"set model.size_mode=pad (pad to {math.ceil(size / factor) * factor}) or crop, use "
        f"fewer resolutions in model.channel_mult, or an image_size divisible by {factor}"
    )
    if cfg.size_mode == "error":
        raise ArchitectureError(
            f"model.image_size={size} is not divisible by the downsampling factor {factor} "
            f"(2^(len(model.channel_mult)-1) with channel_mult={cfg.channel_mult}); {fix}"
        )
    if cfg.size_mode == "pad":
        padded = math.ceil(size / factor) * factor
        return _Geometry(padded, size, (padded - size) // 2)
    cropped = (size // factor) * factor
    if cropped == 0:
        raise ArchitectureError(
            f"model.size_mode=crop would crop model.image_size={size} to nothing (downsampling factor "
            f"{factor}); use size_mode=pad or fewer resolutions in model.channel_mult"
        )
    return _Geometry(cropped, cropped, (size - cropped) // 2)


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
    * ``model.likelihood``, ``model.latent_shape`` (C, h, w), ``model.num_dims``
      (pixels x channels the likelihood scores, for bits/dim), ``model.num_parameters()``,
      ``model.config`` (the ModelConfig it was built from).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.likelihood: Likelihood = build_likelihood(cfg.likelihood, cfg.gaussian_std)
        self._geometry = _geometry(cfg)
        factor = 2 ** (len(cfg.channel_mult) - 1)
        side = self._geometry.network_size // factor
        out_channels = self.likelihood.params_per_channel * cfg.in_channels
        self.encoder: nn.Module
        self.decoder: nn.Module
        if cfg.arch == "compact":
            self.encoder = CompactEncoder(cfg, side)
            self.decoder = CompactDecoder(cfg, out_channels, side)
            self.latent_shape: tuple[int, int, int] = (cfg.latent_channels, 1, 1)
        else:
            self.encoder = Encoder(cfg)
            self.decoder = Decoder(cfg, out_channels)
            self.latent_shape = (cfg.latent_channels, side, side)
        # the local autoregressive path over the image (None: pixels independent given z)
        self.autoregressive: LocalAutoregressive | None = None
        if cfg.autoregressive_channels:
            self.autoregressive = LocalAutoregressive(
                cfg.in_channels, out_channels, cfg.autoregressive_channels, cfg.autoregressive_layers,
                cfg.autoregressive_kernel,
            )
        self.num_dims: int = cfg.in_channels * self._geometry.output_size**2

    @property
    def size_mode(self) -> str:
        """How odd image sizes are handled: pad, crop or error (from the config)."""
        return self.config.size_mode

    @property
    def output_size(self) -> int:
        """Side of the images the model scores and produces (image_size unless cropping)."""
        return self._geometry.output_size

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # -- input handling -------------------------------------------------------------

    def _check(self, x: torch.Tensor, check_range: bool = True) -> None:
        """Reject batches of the wrong rank, channels, size or dtype, and (``check_range``) value range.

        The shape and dtype checks read only metadata. The range check is one
        ``aminmax`` whose result the host must read: a device sync, so a caller whose
        data is in range by construction may skip it (see :meth:`forward`).
        """
        cfg = self.config
        expected = f"[B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}]"
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputShapeError(f"the model takes image batches of shape {expected}, got {shape}")
        if x.shape[1] != cfg.in_channels:
            raise InputShapeError(
                f"images have {x.shape[1]} channels but the model was built for model.in_channels="
                f"{cfg.in_channels}; set model.in_channels={x.shape[1]} or convert the images"
            )
        if x.shape[2] != cfg.image_size or x.shape[3] != cfg.image_size:
            raise InputShapeError(
                f"images are {x.shape[2]}x{x.shape[3]} but the model was built for model.image_size="
                f"{cfg.image_size}; set model.image_size, or resize/crop the data (data.resize=true)"
            )
        if not x.is_floating_point():
            raise InputShapeError(
                f"images have dtype {x.dtype}; the model takes floating-point pixels in "
                f"{self.likelihood.value_range} (scale 8-bit images first)"
            )
        if x.numel() == 0:
            raise InputShapeError("the image batch is empty")
        if not check_range:
            return
        lo, hi = (float(v) for v in torch.aminmax(x.detach()))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise InputShapeError("the image batch holds NaN or infinite pixel values; check the data source")
        self.likelihood.check_range(lo, hi)

    def _prepare(self, x: torch.Tensor, check_range: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Check ``x`` once and return (network input, likelihood target).

        The network input takes the weights' dtype (bf16/fp16 models accept fp32
        batches); the target keeps the data's precision, so 8-bit levels stay exact.
        """
        self._check(x, check_range)
        geo = self._geometry
        net_dtype = self.encoder.conv_in.weight.dtype
        if geo.network_size == self.config.image_size:
            return x.to(net_dtype), x
        if geo.network_size > self.config.image_size:  # pad mode
            before = geo.offset
            after = geo.network_size - self.config.image_size - before
            background = self.likelihood.value_range[0]
            return F.pad(x, (before, after, before, after), value=background).to(net_dtype), x
        end = geo.offset + geo.network_size  # crop mode
        cropped = x[:, :, geo.offset : end, geo.offset : end]
        return cropped.to(net_dtype), cropped

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """The checked input as the likelihood scores it (centre-cropped in crop mode)."""
        return self._prepare(x)[1]

    # -- the VAE --------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters ``(mu, logvar)`` of q(z|x), each ``[B, *latent_shape]``."""
        return self.encoder(self._prepare(x)[0])

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
        """Likelihood parameters of the image ``x`` given latents ``z``, cropped to the image the model describes.

        An autoregressive model needs the image it scores: pass ``x`` (the likelihood
        target, as :meth:`target` returns it) or its precomputed :meth:`context`;
        ``z`` may hold several latents per image, ``[m * B, ...]`` sample-major (as the
        importance-weighted bound decodes them). A plain model ignores both. For
        images from latents alone use :meth:`generate`.
        """
        params = self.decoder(z)
        geo = self._geometry
        if geo.network_size > geo.output_size:  # pad mode: drop the padding again
            end = geo.offset + geo.output_size
            params = params[:, :, geo.offset : end, geo.offset : end]
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
        return add_context(params, context)

    @torch.no_grad()
    def generate(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in the data range for latents ``z``: the likelihood's mean of ``decode(z)`` for a plain
        decoder; for an autoregressive one, a pixel-by-pixel draw, shown as each pixel's probability
        given its drawn past (``generator`` drives the draw)."""
        if self.autoregressive is None:
            return self.likelihood.mean(self.decode(z))
        base = self.decoder(z)
        geo = self._geometry
        if geo.network_size > geo.output_size:
            end = geo.offset + geo.output_size
            base = base[:, :, geo.offset : end, geo.offset : end]
        return sample_autoregressive(self.autoregressive, base, generator)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, check_range: bool = True
                ) -> VAEOutput:
        """One-sample ELBO terms for ``x`` (``[B, C, H, W]`` in ``likelihood.value_range``).

        ``check_range=False`` skips the pixel-range check (NaN, infinities, values
        outside the likelihood's range), which costs a host sync per call. The
        trainer checks its first batch and then skips it: its data stream decodes
        every image into the likelihood's range by construction.
        """
        net_input, target = self._prepare(x, check_range)
        mu, logvar = self.encoder(net_input)
        z, kl, kl_per_channel = reparam_kl(
            mu, logvar, generator=generator, return_per_channel=True, impl=self.config.reparam
        )
        params = self.decode(z, target)
        recon_nll = -self.likelihood.log_prob(target, params)
        return VAEOutput(
            recon_nll=recon_nll,
            kl=kl.float(),
            kl_per_channel=kl_per_channel.float(),
            z=z,
            mu=mu,
            logvar=logvar,
            x_params=params,
        )

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` images from the prior (scaled by ``temperature``), as the likelihood's mean."""
        if n < 1 or temperature < 0:
            raise ValueError(f"sample needs n >= 1 and temperature >= 0, got n={n}, temperature={temperature}")
        device = next(self.parameters()).device
        z = torch.randn((n, *self.latent_shape), generator=generator, device=device) * temperature
        return self.generate(z, generator)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstructions: the likelihood's mean of ``decode(mu, x)``.

        For an autoregressive decoder that is each pixel's probability given ``mu`` and
        the input's own earlier pixels (what the likelihood scores), not a free draw.
        """
        net_input, target = self._prepare(x)
        mu, _ = self.encoder(net_input)
        return self.likelihood.mean(self.decode(mu, target))
