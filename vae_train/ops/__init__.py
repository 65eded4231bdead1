"""Fused reparameterization + KL op: ``z = mu + exp(logvar/2) * eps`` and ``KL(q || N(0, I))``.

Public interface::

    from vae_train.ops import reparam_kl, reparam_kl_reference, backend

    z, kl = reparam_kl(mu, logvar)                                   # fused C++/CUDA op
    z, kl, kl_c = reparam_kl(mu, logvar, return_per_channel=True)    # + [B, C] KL
    z, kl = reparam_kl(mu, logvar, impl="reference")                 # plain PyTorch
    backend()  # "cpu-fused" | "cuda-fused" | "reference"

Importing this package is cheap: the extension is built (once per user, cached)
or loaded on the first fused call or ``backend()``; ``vae-train build-ops`` does
it ahead of time.
"""

from vae_train.ops.api import ReparamInputError, backend, reparam_kl
from vae_train.ops.build import FusedOpFallbackWarning, FusedOpUnavailable
from vae_train.ops.reference import LOGVAR_MAX, LOGVAR_MIN, reparam_kl_reference, soft_clamp_logvar

__all__ = [
    "LOGVAR_MAX",
    "LOGVAR_MIN",
    "FusedOpFallbackWarning",
    "FusedOpUnavailable",
    "ReparamInputError",
    "backend",
    "reparam_kl",
    "reparam_kl_reference",
    "soft_clamp_logvar",
]
