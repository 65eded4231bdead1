"""The local autoregressive path of the decoder (``model.autoregressive_channels > 0``).

p(x|z) = prod_i Bernoulli(x_i; sigmoid(d_i(z) + a_i(x_<i))), pixels in raster order:
``d(z)`` is the decoder's logit map and ``a`` a small PixelCNN (van den Oord et al.
2016) over the image itself -- masked convolutions, so pixel i sees only the pixels
above it and to its left, within a few pixels (the first, "type A" mask also hides
the pixel itself; later "type B" masks let a pixel's features through). This is the
PixelVAE idea (Gulrajani et al. 2017) in its cheapest form: the local texture and
stroke continuity that independent pixels cannot express come from ``a``, the
global shape from ``z``.

Why the two parts are *added* as logits instead of mixed by a network: ``a(x)``
does not depend on z, so the importance-weighted bound computes it once per image
(:meth:`LocalAutoregressive.forward` -> the ``context``) and each of its K samples
costs one plain decoder pass plus an addition.

With ``model.autoregressive_gates = M > 0`` the two parts also meet through M
products: the decoder emits M more maps ``g_m(z)`` and the path M more maps
``c_m(x_<i)``, and ``logit_i = d_i(z) + a_i(x_<i) + sum_m g_m,i(z) * c_m,i(x_<i)``.
The latent then sets, pixel by pixel, how much each local feature counts (how
strongly the neighbours predict a pixel differs between a flat region and an
edge), which a sum cannot express; each sample still costs one decoder pass plus
M+1 multiply-adds per pixel, so the bound's cost barely moves.

The price is sampling: a generated image needs one pass of ``a`` per pixel (raster
order, all channels of a pixel at once), 784 small passes at 28x28, done in
:func:`sample_autoregressive`. Scoring (training, ELBO, IWAE) is one pass, since
the image is given.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class MaskedConv2d(nn.Conv2d):
    """A same-padded convolution that sees only pixels before the centre in raster order.

    ``include_centre=False`` (type A) also hides the centre pixel; ``True`` (type B)
    lets it through. All input channels of a pixel are treated alike, so every output
    channel of pixel i depends only on pixels before i (type A) -- the pixels' channels
    are conditionally independent given the past and z.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, include_centre: bool) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        mask = torch.ones(kernel_size, kernel_size)
        centre = kernel_size // 2
        mask[centre, centre + int(include_centre):] = 0
        mask[centre + 1:] = 0
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask.to(self.weight.dtype), self.bias, padding=self.padding)


class LocalAutoregressive(nn.Module):
    """The masked-convolution stack: image ``[B, C, H, W]`` -> logit offsets ``[B, out_channels, H, W]``.

    Its receptive field is ``autoregressive_kernel // 2 + autoregressive_layers - 1``
    pixels up and to the left: local on purpose, so the latent keeps the global
    structure to describe (an unrestricted PixelCNN learns to ignore z).
    """

    def __init__(self, in_channels: int, out_channels: int, width: int, layers: int, kernel: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        convs: list[nn.Module] = [MaskedConv2d(in_channels, width, kernel, include_centre=False)]
        for _ in range(layers - 1):
            convs += [nn.SiLU(), MaskedConv2d(width, width, 3, include_centre=True)]
        convs += [nn.SiLU(), nn.Conv2d(width, out_channels, kernel_size=1)]
        self.net = nn.Sequential(*convs)
        self.reach = kernel // 2 + layers - 1  # pixels up/left/right that one output can see
        # Start as a no-op, so early training sees the plain VAE and the latent gets used from the start.
        nn.init.zeros_(convs[-1].weight)
        nn.init.zeros_(convs[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(self.net[0].weight.dtype))


def combine(params: torch.Tensor, context: torch.Tensor, channels: int, dim: int = 1) -> torch.Tensor:
    """The likelihood's parameters (``channels`` maps in dimension ``dim``) from the decoder's maps and the
    path's context.

    Both hold ``channels * (1 + M)`` maps in dimension ``dim`` (``M = model.autoregressive_gates``):
    the first ``channels`` are added; the remaining ``M`` groups of ``channels`` are
    multiplied pairwise and summed over the groups. ``context`` broadcasts against
    ``params`` (one image's context serves its many latents).
    """
    context = context.to(params.dtype)
    logits = params.narrow(dim, 0, channels) + context.narrow(dim, 0, channels)
    extra = params.shape[dim] - channels
    if extra == 0:
        return logits
    products = params.narrow(dim, channels, extra) * context.narrow(dim, channels, extra)
    return logits + products.unflatten(dim, (-1, channels)).sum(dim)


def add_context(params: torch.Tensor, context: torch.Tensor, channels: int) -> torch.Tensor:
    """Decoded maps ``[m*B, ...]`` (m latents per image, sample-major) combined with the images' context
    ``[B, ...]`` (:func:`combine`): the likelihood's parameters ``[m*B, channels, ...]``."""
    batch = context.shape[0]
    if params.shape[0] % batch:
        raise ValueError(f"{params.shape[0]} decoded latents do not divide into the {batch} images' contexts")
    per_image = params.unflatten(0, (params.shape[0] // batch, batch))
    return combine(per_image, context.unsqueeze(0), channels, dim=2).flatten(0, 1)


@torch.no_grad()
def sample_autoregressive(
    net: LocalAutoregressive, decoded: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Binary images drawn pixel by pixel from ``sigmoid(combine(decoded, net(x_<i)))``; returns each
    pixel's probability given its drawn past, ``[B, C, H, W]`` float32.

    The returned map holds ``P(x_i = 1 | x_<i, z)``: the grey-level picture a plain
    VAE's mean would show, consistent with the binary sample. Each step runs ``net``
    on the window that pixel i can see (``reach`` rows up, ``reach`` columns either
    side, cut at the image's borders), not on the whole image: exact, because the
    features the window's inner edges get wrong lie outside the pixel's cone of
    dependence, and ~17x cheaper at 28x28.
    """
    r = net.reach
    batch, _, height, width = decoded.shape
    channels = net.in_channels
    canvas = torch.zeros((batch, channels, height, width), device=decoded.device)
    probs = torch.zeros_like(canvas)
    for row in range(height):
        top = max(0, row - r)
        for col in range(width):
            left = max(0, col - r)
            # the window is cut at the image's borders, so every layer pads there with zeros as on the full image
            window = canvas[:, :, top : row + 1, left : min(width, col + r + 1)]
            context = net(window)[:, :, row - top, col - left]
            p = torch.sigmoid(combine(decoded[:, :, row, col].float(), context.float(), channels))
            probs[:, :, row, col] = p
            draw = torch.rand(p.shape, generator=generator, device=p.device)
            canvas[:, :, row, col] = (draw < p).float()
    return probs
