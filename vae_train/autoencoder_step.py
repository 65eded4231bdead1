"""One optimizer step of the latent-diffusion autoencoder recipe: the autoencoder's update, then the discriminator's.

Per micro-batch: encoder -> reparameterization/KL -> decoder; the objective
(:mod:`vae_train.losses.autoencoder`: pixel NLL + LPIPS + beta * KL, and from
``loss.disc_start`` the adaptive adversarial term through the discriminator, whose
parameters are frozen for this pass so no gradient reaches them) is backpropagated into
the autoencoder's engine; then, from ``disc_start``, the discriminator's loss on the
real images and the detached reconstructions is backpropagated into its own engine.
At the accumulation boundary each engine takes its gated step: applied or skipped on
every rank together (non-finite loss or gradients), the discriminator's gate seeing its
own loss. Before ``disc_start`` the discriminator is not run at all: its weights,
optimizer state and step count stay exactly as built.

No host sync per micro-batch: the terms, the finiteness flags and the adaptive
weight's gradients (averaged over ranks by an on-device all-reduce) stay on the device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vae_train.distributed import peer_group
from vae_train.engine import Engine, StepDecision
from vae_train.losses import AutoencoderObjective, LastLayerTap

TERMS = ("loss", "nll", "pixel", "perceptual", "kl", "g_loss", "adaptive_weight", "logvar", "d_loss",
         "logits_real", "logits_fake")
"""Names of :attr:`AutoencoderStepResult.sums`, in order (logged as ``train/<name>``)."""


@dataclass
class AutoencoderStepResult:
    """One step as this rank saw it; decisions are the same on every rank (``disc_decision`` None before disc_start)."""

    decision: StepDecision
    disc_decision: StepDecision | None
    micro_batches: int
    sums: torch.Tensor  # float64 [len(TERMS)] on the device, summed over micro-batches
    kl_per_channel: torch.Tensor
    first_input: torch.Tensor


def _reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, on the device (no host sync)."""
    group = peer_group()
    if group is None:
        return tensor
    tensor = tensor.clone()
    group.all_reduce(tensor)
    return tensor / group.get_world_size()


def autoencoder_step(engine: Engine, disc: Engine | None, objective: AutoencoderObjective, tap: LastLayerTap | None,
                     batches: Iterator[dict[str, Any]], step: int, beta: float, *, check_range: bool = False,
                     flags: Sequence[bool] = ()) -> AutoencoderStepResult:
    """Optimizer step ``step`` (0-based) of the autoencoder and (from ``loss.disc_start``) the discriminator.

    ``flags`` ride the autoencoder step's all-reduce, as in :func:`vae_train.trainer.train_step`."""
    adversarial = disc is not None and step >= objective.cfg.disc_start
    finite = torch.ones((), dtype=torch.bool, device=engine.device)
    d_finite = torch.ones((), dtype=torch.bool, device=engine.device)
    sums = torch.zeros(len(TERMS), dtype=torch.float64, device=engine.device)
    kl_channels: torch.Tensor | None = None
    first_input: torch.Tensor | None = None
    zero = torch.zeros((), device=engine.device)
    for micro in range(engine.plan.grad_accum_steps):
        last = micro == engine.plan.grad_accum_steps - 1
        batch = next(batches)
        x = batch["image"].to(engine.device, engine.compute_dtype, non_blocking=True)
        first_input = x if first_input is None else first_input
        out = engine.forward(x, check_range=check_range)
        critic = None
        if adversarial:
            assert disc is not None
            disc.module.requires_grad_(False)  # the decoder's pass: no gradient may reach the discriminator
            critic = disc.module
        try:
            terms = objective.generator_terms(engine.module, x, out.x_params, out.kl, beta, critic, tap, _reduce_mean)
        finally:
            if adversarial:
                disc.module.requires_grad_(True)  # type: ignore[union-attr]
        finite &= torch.isfinite(terms.loss)
        if last:
            engine.arm(finite, flags)  # before the last backward, as in train_step
        engine.backward(terms.loss)
        d_loss, real, fake = zero, zero, zero
        if adversarial:
            assert disc is not None
            d_loss, real, fake = objective.discriminator_terms(disc.forward, x, out.x_params)
            d_finite &= torch.isfinite(d_loss)
            if last:
                disc.arm(d_finite)
            disc.backward(d_loss)
        values = [terms.loss, terms.nll, terms.pixel, terms.perceptual, terms.kl, terms.g_loss, terms.adaptive,
                  terms.logvar, d_loss.detach(), real, fake]
        sums += torch.stack([v.detach().float() for v in values]).double()
        means = out.kl_per_channel.detach().float().mean(0)
        kl_channels = means if kl_channels is None else kl_channels + means
    decision = engine.step(step)
    disc_decision = disc.step(step) if adversarial else None  # type: ignore[union-attr]
    assert kl_channels is not None and first_input is not None
    return AutoencoderStepResult(decision, disc_decision, engine.plan.grad_accum_steps, sums, kl_channels, first_input)
