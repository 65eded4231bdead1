"""Anomaly scores of a trained VAE, one number per image (higher = more anomalous).

Used by ``vae-train score`` and ``benchmarks/anomaly.py``. Every score is a plain
function of per-image *terms* (:func:`image_terms`, one forward pass, plus K
importance samples for ``iw``) and, for the scores that compare an image with the
normal data, of a :class:`NormalFit` made from the model's terms on normal
(training-class) images:

``nelbo``       negative ELBO, nats.
``iw``          importance-weighted NLL (IWAE bound, K samples), nats.
``recon``       reconstruction error of the posterior mean: ``-log p(x | z = mu(x))``, nats.
``complexity``  complexity-corrected likelihood (Serra et al. 2020): the NLL (``iw`` when
                computed, else ``nelbo``) minus the input's lossless-compressed length,
                its PNG size in bits converted to nats. Compressed is the image the model
                scores (after binarization, for a Bernoulli model), at 8 bits per pixel.
``latent``      Mahalanobis distance (squared) of the posterior mean ``mu(x)`` from a
                Gaussian fitted to the normal images' posterior means (shrunk covariance).
``knn``         mean Euclidean distance of ``mu(x)`` to the posterior means of its
                :data:`KNN_K` nearest normal images (no Gaussian shape assumed: a class
                with several modes, e.g. bags with and without handles, keeps them).
``combined``    ``z(latent) + z(knn) + z(recon - png)``: the two latent distances plus the
                complexity-corrected reconstruction error of the posterior mean (deterministic,
                unlike the sampled ELBO), each z-normalised by its mean and standard deviation
                over the normal images: an image far from the normal data in latent space (under
                a Gaussian *or* among its nearest neighbours) or explained worse than its
                compressed size predicts is flagged. The three terms err on different classes
                (``benchmarks/anomaly.py``: the latent distances on shirts, the complexity term
                on trousers and sneakers), so their sum is the strongest score there.

Why the last three: likelihood scores rank images with few "on" pixels (sandals,
trousers) as normal under any model (Nalisnick et al. 2019); the complexity
correction removes part of that bias; distances to the normal class, in pixel
space and in the latent space, do not have it at all.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vae_train.errors import VaeTrainError

SCORES: dict[str, str] = {
    "nelbo": "negative ELBO (nats)",
    "iw": "importance-weighted NLL, IWAE bound with K samples (nats)",
    "recon": "reconstruction error of the posterior mean, -log p(x | mu(x)) (nats)",
    "complexity": "NLL (iw if computed, else nelbo) minus the PNG size of the scored image (nats)",
    "latent": "squared Mahalanobis distance of mu(x) from the normal images' posterior means",
    "knn": "mean distance of mu(x) to the posterior means of its 5 nearest normal images",
    "combined": "z(latent) + z(knn) + z(recon - png), z-normalised on the normal images",
}
DEFAULT_SCORE = "combined"
NEEDS_FIT = ("latent", "knn", "combined")
"""Scores that compare an image with the normal data (they need ``--fit-data``)."""
KNN_K = 5
"""Neighbours averaged by the ``knn`` score."""
MAX_FULL_COVARIANCE_DIMS = 4096
"""Latents with more units than this get a diagonal Gaussian (a full covariance would not fit)."""


class ScoreError(VaeTrainError):
    """An anomaly score cannot be computed as asked (unknown name, no normal data to fit...)."""


def check_score_name(name: str) -> str:
    """``name`` if it is a known score, else a clear error listing them."""
    if name not in SCORES:
        raise ScoreError(f"unknown score {name!r}; choose one of {', '.join(SCORES)}")
    return name


def png_nats(images: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """Lossless PNG size (maximum zlib compression) of each image, in nats, float64 ``[B]``.

    ``images`` ``[B, C, H, W]`` in ``value_range`` are quantised to 8 bits first (exact
    for 8-bit data and for binary images, which become 0/255).
    """
    from PIL import Image

    lo, hi = value_range
    pixels = ((images.detach().double().cpu() - lo) / (hi - lo) * 255).round().clamp(0, 255).to(torch.uint8)
    sizes = []
    for image in pixels.numpy():
        array = image[0] if image.shape[0] == 1 else np.ascontiguousarray(image.transpose(1, 2, 0))
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG", optimize=True)
        sizes.append(len(buffer.getvalue()) * 8 * math.log(2))
    return torch.tensor(sizes, dtype=torch.float64)


@torch.no_grad()
def image_terms(
    model: Any, x: torch.Tensor, *, iw_samples: int = 0, iw_batch_size: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Per-image terms of a batch (float64, CPU): ``nelbo``, ``recon``, ``png``, ``iw`` (when
    ``iw_samples > 0``) and ``mu`` (posterior means flattened, ``[B, D]``). The IWAE bound draws
    its noise first, as in :func:`vae_train.evaluate.score_images`."""
    from vae_train.evaluate import iw_nll

    bound = iw_nll(model, x, iw_samples, iw_batch_size=iw_batch_size, generator=generator) if iw_samples > 0 else None
    out = model(x, generator=generator)
    target = model.target(x)
    recon = -model.likelihood.log_prob(target, model.decode(out.mu, target))
    terms = {
        "nelbo": out.nelbo.double().cpu(),
        "recon": recon.double().cpu(),
        "png": png_nats(target, model.likelihood.value_range),
        "mu": out.mu.flatten(1).double().cpu(),
    }
    if bound is not None:
        terms["iw"] = bound.cpu()
    return terms


def base_scores(terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The scores that need no normal data: ``nelbo``, ``recon``, ``complexity`` and ``iw`` when
    computed; plus ``recon_png`` (``recon - png``), the part :class:`NormalFit` combines."""
    nll = terms.get("iw", terms["nelbo"])
    scores = {"nelbo": terms["nelbo"], "recon": terms["recon"], "complexity": nll - terms["png"],
              "recon_png": terms["recon"] - terms["png"]}
    if "iw" in terms:
        scores["iw"] = terms["iw"]
    return scores


@dataclass
class LatentGaussian:
    """A Gaussian over posterior means: ``mean`` ``[D]`` and ``precision`` (``[D, D]`` or diagonal ``[D]``)."""

    mean: torch.Tensor
    precision: torch.Tensor

    @classmethod
    def from_sums(cls, count: float, total: torch.Tensor, outer: torch.Tensor, shrinkage: float = 0.1
                  ) -> "LatentGaussian":
        """Fit from ``count`` images' ``sum mu`` and ``sum mu mu^T`` (or ``sum mu^2`` for a diagonal).

        The covariance is shrunk toward its mean variance, ``(1-s) C + s (tr C / D) I``:
        with fewer images than latent units the sample covariance is singular.
        """
        if count < 2:
            raise ScoreError(f"fitting the normal images' latent Gaussian needs at least 2 images, got {count:g}")
        mean = total / count
        if outer.dim() == 1:
            var = (outer / count - mean.square()).clamp(min=0)
            var = (1 - shrinkage) * var + shrinkage * var.mean() + 1e-8
            return cls(mean, 1.0 / var)
        cov = outer / count - torch.outer(mean, mean)
        dims = cov.shape[0]
        cov = (1 - shrinkage) * cov + (shrinkage * torch.trace(cov) / dims + 1e-8) * torch.eye(dims, dtype=cov.dtype)
        return cls(mean, torch.linalg.inv(cov))

    def distance(self, mu: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance of each row of ``mu`` ``[B, D]``, float64 ``[B]``."""
        d = mu.double() - self.mean
        if self.precision.dim() == 1:
            return (d.square() * self.precision).sum(1)
        return ((d @ self.precision) * d).sum(1)


def latent_moments(mu: torch.Tensor) -> torch.Tensor:
    """``sum mu mu^T`` (or ``sum mu^2`` for latents above :data:`MAX_FULL_COVARIANCE_DIMS`) of ``[B, D]`` rows."""
    mu = mu.double()
    if mu.shape[1] > MAX_FULL_COVARIANCE_DIMS:
        return mu.square().sum(0)
    return mu.T @ mu


def knn_distance(bank: torch.Tensor, queries: torch.Tensor, *, exclude_self: bool = False,
                 chunk: int = 1024) -> torch.Tensor:
    """Mean Euclidean distance of each query row to its :data:`KNN_K` nearest ``bank`` rows, float64 ``[B]``.

    ``exclude_self`` drops each query's nearest row: for queries that are rows of the bank
    (the normal images themselves, scored leave-one-out).
    """
    k = min(KNN_K + int(exclude_self), bank.shape[0])
    out = []
    for start in range(0, queries.shape[0], chunk):
        nearest = torch.cdist(queries[start:start + chunk].float(), bank.float()).topk(k, largest=False).values
        out.append((nearest[:, 1:] if exclude_self else nearest).mean(1))
    return torch.cat(out).double() if out else torch.zeros(0, dtype=torch.float64)


@dataclass
class NormalFit:
    """What the normal images tell: their latent Gaussian, their posterior means (``bank``, for
    ``knn``) and the mean/std of each score on them (for the z-normalised ``combined``)."""

    gaussian: LatentGaussian
    bank: torch.Tensor
    stats: dict[str, tuple[float, float]]

    def scores(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every score of :data:`SCORES` that the terms allow (``iw`` only when computed), plus ``recon_png``."""
        scores = base_scores(terms)
        scores["latent"] = self.gaussian.distance(terms["mu"])
        scores["knn"] = knn_distance(self.bank, terms["mu"])
        scores["combined"] = self.z(scores, "latent") + self.z(scores, "knn") + self.z(scores, "recon_png")
        return scores

    def z(self, scores: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        mean, std = self.stats[name]
        return (scores[name] - mean) / std


def score_moments(fit_scores: dict[str, torch.Tensor]) -> dict[str, tuple[float, float, float]]:
    """(count, sum, sum of squares) of each score over some normal images (all-reducible)."""
    return {name: (float(v.numel()), float(v.sum()), float(v.square().sum())) for name, v in fit_scores.items()}


def stats_from_moments(moments: dict[str, tuple[float, float, float]]) -> dict[str, tuple[float, float]]:
    """(mean, std) per score from :func:`score_moments` (summed over ranks); std is at least 1e-12."""
    stats = {}
    for name, (count, total, squares) in moments.items():
        mean = total / count
        stats[name] = (mean, math.sqrt(max(squares / count - mean * mean, 0.0)) or 1e-12)
    return stats
