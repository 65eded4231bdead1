"""The public entry point: validate inputs, pick the implementation, draw the noise seed."""

from __future__ import annotations

from typing import Literal

import torch

from vae_train.errors import VaeTrainError
from vae_train.ops import fused
from vae_train.ops.reference import reparam_kl_reference

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
Impl = Literal["fused", "reference"]


class ReparamInputError(VaeTrainError, ValueError):
    """mu / logvar / eps / generator do not fit together."""


def _check(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None, generator, impl: str) -> None:
    if impl not in ("fused", "reference"):
        raise ReparamInputError(f"reparam_kl: impl={impl!r} is not one of 'fused', 'reference'.")
    if not all(isinstance(t, torch.Tensor) for t in (mu, logvar) + (() if eps is None else (eps,))):
        raise ReparamInputError("reparam_kl: mu, logvar (and eps when given) must be tensors.")
    if mu.dim() == 0:
        raise ReparamInputError("reparam_kl: mu needs a batch dimension [B, ...]; got a 0-d tensor.")
    if mu.dtype not in SUPPORTED_DTYPES:
        raise ReparamInputError(f"reparam_kl: dtype {mu.dtype} is not supported; use float32, bfloat16 or float16.")
    tensors = {"logvar": logvar} if eps is None else {"logvar": logvar, "eps": eps}
    for name, t in tensors.items():
        if t.shape != mu.shape or t.dtype != mu.dtype or t.device != mu.device:
            raise ReparamInputError(
                f"reparam_kl: {name} is {tuple(t.shape)} {t.dtype} on {t.device} but mu is "
                f"{tuple(mu.shape)} {mu.dtype} on {mu.device}; they must match (cast or move one of them)."
            )
    if generator is not None and generator.device.type != mu.device.type:
        raise ReparamInputError(
            f"reparam_kl: the generator is on {generator.device} but mu is on {mu.device}; "
            f"pass a generator of the same device type."
        )


def _draw_seed(generator: torch.Generator | None) -> torch.Tensor:
    """A 62-bit noise seed drawn from ``generator`` (the default CPU generator when None),
    so torch.manual_seed and explicit generators control the fused op's noise."""
    if generator is None:
        return torch.randint(0, 2**62, (), dtype=torch.int64)
    return torch.randint(0, 2**62, (), dtype=torch.int64, generator=generator, device=generator.device).cpu()


@torch.compiler.assume_constant_result
def _fused_for(device_type: str) -> bool:
    """Whether the compiled op serves this device type. torch.compile calls this
    once while tracing and keeps the answer, instead of tracing into the build."""
    build_plan = fused.available()
    if build_plan is None:
        return False
    return device_type == "cpu" or (device_type == "cuda" and build_plan.with_cuda)


def reparam_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    return_per_channel: bool = False,
    impl: Impl = "fused",
) -> tuple[torch.Tensor, ...]:
    """Reparameterized sample and KL to N(0, I), fused into one pass (and one backward pass).

    ``mu``, ``logvar``: ``[B, ...]`` float32/bfloat16/float16 (float64 for checks).
    Returns ``(z, kl)``: ``z`` in the input dtype, ``kl`` ``[B]`` float32 (the sum
    over all non-batch dims); with ``return_per_channel=True`` also
    ``kl_per_channel`` ``[B, C]`` (C = dim 1, summed over the remaining dims) from
    the same pass, for free bits and the active-units statistic. ``logvar`` is
    soft-clamped into (-20, 10) (see :mod:`vae_train.ops.reference`).

    Noise: with ``eps=None`` a seed is drawn from ``generator`` (default: the
    global CPU generator) and the kernel derives eps from it (Philox), so the same
    generator state gives the same sample. The reference draws ``torch.randn``
    instead: both are N(0, I), but not the same numbers. ``eps`` gets no gradient.

    ``impl="fused"`` uses the compiled op when it builds (else the reference, after
    one warning; ``VAE_TRAIN_REQUIRE_FUSED=1`` makes that an error);
    ``impl="reference"`` always uses plain PyTorch (config ``model.reparam``).
    """
    _check(mu, logvar, eps, generator, impl)
    if impl == "reference" or not _fused_for(mu.device.type):
        return reparam_kl_reference(mu, logvar, eps, generator, return_per_channel=return_per_channel)
    z, kl, kl_per_channel = fused.reparam_kl_fused(
        mu.contiguous(),
        logvar.contiguous(),
        None if eps is None else eps.detach().contiguous(),
        _draw_seed(generator),
    )
    if return_per_channel:
        return z, kl, kl_per_channel
    return z, kl


def backend() -> str:
    """The implementation ``reparam_kl`` uses: "cuda-fused", "cpu-fused" or "reference".

    Builds the extension on first call (see :mod:`vae_train.ops.build`).
    """
    build_plan = fused.available()
    if build_plan is None:
        return "reference"
    return "cuda-fused" if build_plan.with_cuda and torch.cuda.is_available() else "cpu-fused"
