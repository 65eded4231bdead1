"""Decoder likelihoods p(x|z): each gives an exact log-likelihood in nats per image.

The decoder outputs ``params_per_channel * C`` maps; a likelihood turns them and
the data ``x`` into ``log p(x|z)`` summed over all pixels (shape ``[B]``). They
are computed in float32 even when the decoder ran in bf16/fp16, because the sum
over thousands of pixels loses the low bits that the ELBO comparison needs.

Which one fits which data (``value_range`` is what the data pipeline must deliver):

* ``bernoulli``: binary pixels in {0, 1} (Fashion-MNIST binarized). The log-mass
  is exact for binary data; for grey values in [0, 1] it is the usual
  cross-entropy, not a normalized likelihood.
* ``gaussian_fixed`` / ``gaussian_learned``: continuous pixels in [-1, 1]; a
  density, so its "bits/dim" is not comparable with discrete likelihoods.
* ``logistic``: 8-bit pixels mapped to [-1, 1] (``k / 127.5 - 1``); the
  discretized logistic of PixelCNN++ assigns each of the 256 bins its exact
  probability mass, so bits/dim are comparable with the literature.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F

from vae_train.model.errors import DataRangeError

_LOG_2PI = math.log(2.0 * math.pi)
# Per-pixel learned log-scales are bounded below: a near-constant background pixel
# would otherwise drive its variance to zero and the log-density to infinity.
_MIN_LOG_SCALE = -7.0
_MAX_LOG_SCALE = 3.0
_RANGE_TOLERANCE = 1e-4

_VALUE_RANGES: dict[str, tuple[float, float]] = {
    "bernoulli": (0.0, 1.0),
    "gaussian_fixed": (-1.0, 1.0),
    "gaussian_learned": (-1.0, 1.0),
    "logistic": (-1.0, 1.0),
}


def likelihood_value_range(name: str) -> tuple[float, float]:
    """The pixel range ``(lo, hi)`` the data must have for likelihood ``name``.

    The data pipeline uses this to scale images (bernoulli: binary {0,1} in [0,1];
    gaussian_*/logistic: [-1,1]), so the two cannot disagree.
    """
    try:
        return _VALUE_RANGES[name]
    except KeyError:
        raise ValueError(f"unknown likelihood {name!r}; choose one of {sorted(_VALUE_RANGES)}") from None


def bits_per_dim(nats: Any, num_dims: int) -> Any:
    """Convert nats (per image) to bits per dimension: ``nats / (D ln 2)``.

    Works on floats, numpy arrays and tensors; the one place this conversion lives.
    """
    return nats / (num_dims * math.log(2.0))


def _sum_pixels(log_p: torch.Tensor) -> torch.Tensor:
    """Sum a per-pixel log-probability map ``[B, ...]`` to ``[B]``."""
    return log_p.flatten(1).sum(dim=1)


class Likelihood(ABC):
    """p(x|z) given the decoder's output maps."""

    name: str
    params_per_channel: int = 1

    @property
    def value_range(self) -> tuple[float, float]:
        """The data range ``(lo, hi)`` this likelihood is defined on."""
        return likelihood_value_range(self.name)

    def check_range(self, lo: float, hi: float) -> None:
        """Raise :class:`DataRangeError` when observed ``[lo, hi]`` leaves the data range."""
        want_lo, want_hi = self.value_range
        if lo < want_lo - _RANGE_TOLERANCE or hi > want_hi + _RANGE_TOLERANCE:
            raise DataRangeError(
                f"pixel values span [{lo:.4g}, {hi:.4g}] but the {self.name!r} likelihood needs data in "
                f"[{want_lo:g}, {want_hi:g}]; scale the images to that range (the data pipeline does so "
                f"from model.likelihood) or choose a likelihood that fits the data "
                f"(bernoulli for binary [0,1], gaussian_*/logistic for [-1,1])"
            )

    @abstractmethod
    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """``log p(x | params)`` in nats, summed over pixels: shape ``[B]``, float32."""

    @abstractmethod
    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """The image the decoder predicts (in ``value_range``), for samples and reconstructions."""

    def _split(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split ``[B, 2C, H, W]`` into location and bounded log-scale maps, in float32."""
        loc, log_scale = params.float().chunk(2, dim=1)
        return loc, log_scale.clamp(_MIN_LOG_SCALE, _MAX_LOG_SCALE)


class Bernoulli(Likelihood):
    """Independent Bernoulli pixels; ``params`` are logits ``[B, C, H, W]``."""

    name = "bernoulli"

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        # x*l - softplus(l) = -BCEWithLogits, stable for large |l|.
        logits = params.float()
        return _sum_pixels(x.float() * logits - F.softplus(logits))

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params.float())


class GaussianFixed(Likelihood):
    """Gaussian pixels with a fixed standard deviation; ``params`` are means ``[B, C, H, W]``."""

    name = "gaussian_fixed"

    def __init__(self, std: float) -> None:
        if std <= 0:
            raise ValueError(f"gaussian std must be > 0, got {std}")
        self.std = float(std)

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        z = (x.float() - params.float()) / self.std
        return _sum_pixels(-0.5 * z.square() - math.log(self.std) - 0.5 * _LOG_2PI)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return params.float().clamp(*self.value_range)


class GaussianLearned(Likelihood):
    """Gaussian pixels with a per-pixel learned variance; ``params`` = (mean, log-std) ``[B, 2C, H, W]``.

    The log-std is clamped to [-7, 3] (see ``_MIN_LOG_SCALE``).
    """

    name = "gaussian_learned"
    params_per_channel = 2

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        loc, log_std = self._split(params)
        z = (x.float() - loc) * torch.exp(-log_std)
        return _sum_pixels(-0.5 * z.square() - log_std - 0.5 * _LOG_2PI)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return self._split(params)[0].clamp(*self.value_range)


class DiscretizedLogistic(Likelihood):
    """8-bit discretized logistic (PixelCNN++, one component); ``params`` = (mean, log-scale) ``[B, 2C, H, W]``.

    Pixel ``k`` in 0..255 is stored as ``x = k / 127.5 - 1``; its bin is
    ``[x - 1/255, x + 1/255]`` and the two edge bins extend to -inf / +inf, so the
    256 masses sum to one. Inputs are snapped to the nearest bin centre, which makes
    the result exact for 8-bit data and well defined for anything in [-1, 1].

    The log of a CDF difference is evaluated as
    ``log sigmoid(hi) + log(-expm1(log sigmoid(lo) - log sigmoid(hi)))`` on the left
    of the mean (mirrored on the right, so both CDFs are never close to 1), which
    stays accurate in float32 from the tails to the mode without the usual pdf
    fallback of PixelCNN++.
    """

    name = "logistic"
    params_per_channel = 2
    num_bins = 256

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        loc, log_scale = self._split(params)
        half = self.num_bins - 1
        level = torch.round((x.float().clamp(-1.0, 1.0) + 1.0) * (half / 2.0))
        centre = level * (2.0 / half) - 1.0
        inv_scale = torch.exp(-log_scale)
        upper = inv_scale * (centre - loc + 1.0 / half)
        lower = inv_scale * (centre - loc - 1.0 / half)
        # Mirror the right side of the mean so both CDF arguments are on the left.
        right = (upper + lower) > 0
        hi = torch.where(right, -lower, upper)
        lo = torch.where(right, -upper, lower)
        # log sigmoid(lo) - log sigmoid(hi), with log sigmoid(a) = a - softplus(a) and the
        # exact bin width lo - hi, so no cancellation even far in the tails.
        log_ratio = -(2.0 / half) * inv_scale - (F.softplus(lo) - F.softplus(hi))
        log_mass = F.logsigmoid(hi) + torch.log(-torch.expm1(log_ratio))
        log_mass = torch.where(level <= 0, F.logsigmoid(upper), log_mass)
        log_mass = torch.where(level >= half, F.logsigmoid(-lower), log_mass)
        return _sum_pixels(log_mass)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return self._split(params)[0].clamp(*self.value_range)


def build_likelihood(name: str, gaussian_std: float = 0.1) -> Likelihood:
    """The likelihood object for a config's ``model.likelihood`` name."""
    if name == "bernoulli":
        return Bernoulli()
    if name == "gaussian_fixed":
        return GaussianFixed(gaussian_std)
    if name == "gaussian_learned":
        return GaussianLearned()
    if name == "logistic":
        return DiscretizedLogistic()
    raise ValueError(f"unknown likelihood {name!r}; choose one of {sorted(_VALUE_RANGES)}")
