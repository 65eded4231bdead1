"""The training objective: reconstruction NLL + beta * KL, with free bits.

Free bits (Kingma et al. 2016, "Improved variational inference with inverse
autoregressive flow"): each latent channel's batch-mean KL is clamped from below
at ``free_bits`` nats. Below the floor the clamp has zero gradient, so the
optimizer stops pushing that channel's posterior onto the prior -- which is what
prevents posterior collapse -- while channels above it are penalized as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vae_train.model.vae import VAEOutput


@dataclass
class LossTerms:
    """Scalars of one step: ``loss`` (to backpropagate), batch means of ``recon`` and ``kl``,
    and ``kl_penalty`` (the KL term beta multiplies, after free bits)."""

    loss: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    kl_penalty: torch.Tensor


def vae_loss(out: VAEOutput, beta: float, free_bits: float) -> LossTerms:
    """``mean_b recon_nll + beta * penalty`` where penalty is ``sum_c max(free_bits, mean_b kl_c)``
    when ``free_bits > 0`` and ``mean_b kl`` otherwise (all in nats per image)."""
    recon = out.recon_nll.mean()
    kl = out.kl.mean()
    if free_bits > 0:
        penalty = out.kl_per_channel.mean(dim=0).clamp(min=free_bits).sum()
    else:
        penalty = kl
    return LossTerms(loss=recon + beta * penalty, recon=recon, kl=kl, kl_penalty=penalty)
