"""Tiled application of a convolutional network, with linearly blended overlaps.

Encoding or decoding an image much larger than the training size in one piece can
exhaust memory (activations grow with the pixel count); running the network on
overlapping tiles bounds it by the tile size. Where tiles overlap, the outputs are
averaged with weights that ramp linearly from the tile's inner edges (a feathered
seam, as diffusers' ``AutoencoderKL`` tiling and the LDM tiled decoders do), so the seams
do not show as steps. Weights are normalized by their sum at every pixel, so any
layout of tiles gives a weighted average; a single tile has weight 1 everywhere and
the result is exactly the untiled one.

Used by :meth:`vae_train.model.ConvVAE.enable_tiling` for encode, decode and
reconstruct (and through them ``vae-train eval`` and ``vae-train reconstruct``).
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import torch


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length`` with at least ``overlap`` shared pixels.

    The last tile ends exactly at ``length`` (it may overlap its neighbour by more). With
    ``length <= tile`` one tile covers everything.
    """
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"tiles need 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _ramp(size: int, overlap: int, before: bool, after: bool, device: torch.device) -> torch.Tensor:
    """1-D blending weights of one tile: rising over ``overlap`` where a neighbour precedes, falling where one follows."""
    w = torch.ones(size, dtype=torch.float32, device=device)
    if overlap <= 0:
        return w
    edge = (torch.arange(size, dtype=torch.float32, device=device) + 0.5) / overlap
    if before:
        w = torch.minimum(w, edge)
    if after:
        w = torch.minimum(w, edge.flip(0))
    return w


def tiled_apply(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], tile: tuple[int, int],
                overlap: tuple[int, int], scale: Fraction) -> torch.Tensor:
    """``fn`` applied to overlapping tiles of ``x`` ``[B, C, H, W]``, blended into one output.

    ``fn`` maps a ``[B, C, h, w]`` tile to ``[B, C', h*scale, w*scale]`` (``scale`` 1/f for an
    encoder that downsamples f times, f for a decoder). Tile sizes, overlaps and the
    input size must be such that every tile offset times ``scale`` is a whole number
    (multiples of f for an encoder); this is checked.
    """
    height, width = x.shape[-2:]
    rows = tile_starts(height, tile[0], overlap[0])
    cols = tile_starts(width, tile[1], overlap[1])
    if len(rows) * len(cols) == 1:  # one tile: weight 1 everywhere, so exactly the untiled result
        return fn(x)
    th, tw = tile

    def out(n: int) -> int:
        value = n * scale
        if value.denominator != 1:
            raise ValueError(f"tile offset or size {n} times the scale {scale} is not a whole number of pixels; use "
                             "tile sizes, overlaps and image sides that are multiples of the downsampling factor")
        return int(value)

    result: torch.Tensor | None = None
    weight_sum: torch.Tensor | None = None
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            y = fn(x[:, :, top : top + th, left : left + tw])
            if result is None:
                result = y.new_zeros((*y.shape[:2], out(height), out(width)), dtype=torch.float32)
                weight_sum = torch.zeros(out(height), out(width), dtype=torch.float32, device=y.device)
            wy = _ramp(y.shape[-2], out(overlap[0]), i > 0, i < len(rows) - 1, y.device)
            wx = _ramp(y.shape[-1], out(overlap[1]), j > 0, j < len(cols) - 1, y.device)
            w = wy[:, None] * wx[None, :]
            r0, c0 = out(top), out(left)
            result[:, :, r0 : r0 + y.shape[-2], c0 : c0 + y.shape[-1]] += y.float() * w
            weight_sum[r0 : r0 + y.shape[-2], c0 : c0 + y.shape[-1]] += w  # type: ignore[index]
    assert result is not None and weight_sum is not None
    return (result / weight_sum).to(y.dtype)
