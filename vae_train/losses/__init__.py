"""Training objectives beyond the ELBO (which lives in :mod:`vae_train.model.loss`).

:mod:`.autoencoder`: the latent-diffusion autoencoder recipe (pixel NLL, LPIPS, KL,
adaptive PatchGAN term). Imports only :mod:`vae_train.model` and the config: no DeepSpeed.
"""

from vae_train.losses.autoencoder import (
    AutoencoderObjective,
    AutoencoderTerms,
    LastLayerTap,
    adaptive_weight,
    attach_output_logvar,
    discriminator_loss,
    generator_adv_loss,
)

__all__ = [
    "AutoencoderObjective", "AutoencoderTerms", "LastLayerTap", "adaptive_weight", "attach_output_logvar",
    "discriminator_loss", "generator_adv_loss",
]
