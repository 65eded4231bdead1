"""Plain-PyTorch reparameterization + KL: the specification the fused kernels must match.

This module is the readable definition of the op (tests compare the C++/CUDA
kernels against it) and the fallback when the extension cannot be built. The
soft clamp of ``logvar`` is part of the definition, so both paths agree on
every input, including the extreme ones.

Why a soft clamp: ``exp(logvar)`` overflows float16 (max 65504) for
``logvar > 11.09``, and a hard clamp kills the gradient that would pull a
runaway ``logvar`` back. The clamp used here is the identity on
``[LOGVAR_LINEAR_MIN, LOGVAR_LINEAR_MAX] = [-15, 5]`` (so ordinary values are
untouched) and bends smoothly, with a tanh knee that is C2-continuous and has
derivative ``1 - tanh(u)**2 > 0``, into the open interval
``(LOGVAR_MIN, LOGVAR_MAX) = (-20, 10)``. At the upper end ``exp(10) = 22026``
and ``sigma = exp(5) = 148``, which leaves float16 headroom for ``z`` and for
the gradients.
"""

from __future__ import annotations

import math

import torch

# Keep in sync with csrc/reparam_kl_math.h (tests/unit/test_ops.py checks it).
LOGVAR_MIN = -20.0
LOGVAR_LINEAR_MIN = -15.0
LOGVAR_LINEAR_MAX = 5.0
LOGVAR_MAX = 10.0


def soft_clamp_logvar(logvar: torch.Tensor) -> torch.Tensor:
    """Identity on [-15, 5], smooth tanh saturation into (-20, 10) outside it."""
    upper = LOGVAR_MAX - LOGVAR_LINEAR_MAX
    lower = LOGVAR_LINEAR_MIN - LOGVAR_MIN
    above = (logvar - LOGVAR_LINEAR_MAX).clamp(min=0) / upper
    below = (LOGVAR_LINEAR_MIN - logvar).clamp(min=0) / lower
    # x - R*(u - tanh u) on each side: the knee removes the part of the excess
    # that tanh saturates away, leaving value and first two derivatives continuous.
    return logvar - upper * (above - torch.tanh(above)) + lower * (below - torch.tanh(below))


def plane_shape(shape: torch.Size) -> tuple[int, int, int]:
    """``(B, C, S)``: batch, channels (dim 1, or 1 for a 1-D input), elements per channel."""
    return shape[0], shape[1] if len(shape) > 1 else 1, math.prod(shape[2:])


def reparam_kl_reference(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    return_per_channel: bool = False,
) -> tuple[torch.Tensor, ...]:
    """``z = mu + exp(lv/2) * eps`` and ``KL(N(mu, exp(lv)) || N(0, I))`` per sample.

    ``lv`` is ``soft_clamp_logvar(logvar)``. The KL is accumulated in float32
    (float64 for float64 inputs) and returned with shape ``[B]``; with
    ``return_per_channel`` also ``[B, C]`` summed over the dims after 1. ``eps``
    is treated as a constant (no gradient flows into it); when it is None it
    is drawn with ``torch.randn(..., generator=generator)``.
    """
    acc = torch.float64 if mu.dtype == torch.float64 else torch.float32
    if eps is None:
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
    lv = soft_clamp_logvar(logvar.to(acc))
    mu_acc = mu.to(acc)
    std = torch.exp(0.5 * lv)
    z = (mu_acc + std * eps.detach().to(acc)).to(mu.dtype)
    kl_elem = 0.5 * (mu_acc * mu_acc + torch.exp(lv) - 1.0 - lv)
    kl_per_channel = kl_elem.reshape(plane_shape(mu.shape)).sum(dim=2)
    kl = kl_per_channel.sum(dim=1)
    if return_per_channel:
        return z, kl, kl_per_channel
    return z, kl
