"""The model library: ConvVAE, the LDM AutoencoderKL, the factory, the likelihoods and the loss.

Imports nothing of the training machinery (no DeepSpeed, WebDataset, boto3), so
an exported model is usable with ``from vae_train.model import ConvVAE`` alone.
"""

from vae_train.model.errors import ArchitectureError, DataRangeError, InputShapeError, ModelError
from vae_train.model.likelihoods import (
    Bernoulli,
    DiscretizedLogistic,
    GaussianFixed,
    GaussianLearned,
    Likelihood,
    bits_per_dim,
    build_likelihood,
    likelihood_value_range,
)
from vae_train.model.factory import VAE, VAE_TYPES, build_model, freeze
from vae_train.model.ldm import AutoencoderKL
from vae_train.model.loss import LossTerms, vae_loss
from vae_train.model.vae import ConvVAE, VAEOutput

__all__ = [
    "ArchitectureError",
    "AutoencoderKL",
    "Bernoulli",
    "ConvVAE",
    "DataRangeError",
    "DiscretizedLogistic",
    "GaussianFixed",
    "GaussianLearned",
    "InputShapeError",
    "Likelihood",
    "LossTerms",
    "ModelError",
    "VAE",
    "VAE_TYPES",
    "VAEOutput",
    "bits_per_dim",
    "build_model",
    "build_likelihood",
    "freeze",
    "likelihood_value_range",
    "vae_loss",
]
