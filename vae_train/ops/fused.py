"""Autograd and fake-tensor registration of the compiled ``vae_train_ops`` operators.

The operators themselves (``reparam_kl_fwd``, ``reparam_kl_bwd``) are defined in
C++ (csrc/binding.cpp) with TORCH_LIBRARY, so torch.compile and DeepSpeed see a
single opaque op. Here we attach what C++ does not provide: the backward formula
(one call to the fused backward kernel for dz, dKL and dKL-per-channel together)
and shape functions for fake tensors.

Saved for backward: mu and logvar (plus the 8-byte seed on ctx). The noise is
regenerated from the seed in the backward kernel instead of being stored, so
the op keeps half the bytes alive that the textbook code does (which stores
sigma, exp(logvar), eps and mu). When the caller passes ``eps`` it is saved too.
Double backward is not supported (the backward op has no autograd formula).
"""

from __future__ import annotations

import functools

import torch

from vae_train.ops import build


def _fake_forward(mu, logvar, eps, seed):
    batch = mu.shape[0]
    channels = mu.shape[1] if mu.dim() > 1 else 1
    acc = torch.float64 if mu.dtype == torch.float64 else torch.float32
    return (
        torch.empty_like(mu, memory_format=torch.contiguous_format),
        mu.new_empty((batch,), dtype=acc),
        mu.new_empty((batch, channels), dtype=acc),
    )


def _fake_backward(grad_z, grad_kl, grad_kl_per_channel, mu, logvar, eps, seed):
    return (
        torch.empty_like(mu, memory_format=torch.contiguous_format),
        torch.empty_like(mu, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output) -> None:
    mu, logvar, eps, seed = inputs
    ctx.save_for_backward(mu, logvar, eps)
    ctx.seed = seed  # an 8-byte CPU scalar, never differentiated


def _backward(ctx, grad_z, grad_kl, grad_kl_per_channel):
    mu, logvar, eps = ctx.saved_tensors
    seed = ctx.seed
    acc = torch.float64 if mu.dtype == torch.float64 else torch.float32
    batch = mu.shape[0]
    channels = mu.shape[1] if mu.dim() > 1 else 1
    # Outputs that did not reach the loss arrive as None: they contribute zero.
    if grad_z is None:
        grad_z = torch.zeros_like(mu)
    if grad_kl is None:
        grad_kl = mu.new_zeros((batch,), dtype=acc)
    if grad_kl_per_channel is None:
        grad_kl_per_channel = mu.new_zeros((batch, channels), dtype=acc)
    grad_mu, grad_logvar = torch.ops.vae_train_ops.reparam_kl_bwd(
        grad_z, grad_kl, grad_kl_per_channel, mu, logvar, eps, seed
    )
    return grad_mu, grad_logvar, None, None


@functools.cache
def available() -> build.BuildPlan | None:
    """Load the extension (building it once) and register autograd/fake kernels; None if unavailable."""
    build_plan = build.loaded()
    if build_plan is None:
        return None
    torch.library.register_fake("vae_train_ops::reparam_kl_fwd")(_fake_forward)
    torch.library.register_fake("vae_train_ops::reparam_kl_bwd")(_fake_backward)
    torch.library.register_autograd("vae_train_ops::reparam_kl_fwd", _backward, setup_context=_setup_context)
    return build_plan


def reparam_kl_fused(
    mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None, seed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, kl, kl_per_channel) from the compiled op; ``available()`` must be true."""
    return torch.ops.vae_train_ops.reparam_kl_fwd(mu, logvar, eps, seed)
