"""Latents of a trained VAE: the posterior a diffusion model is trained on, and its statistics.

A latent diffusion model does not see ``z`` as the VAE produces it but a normalized
``(z - shift_factor) * scaling_factor`` (diffusers' ``AutoencoderKL.config.scaling_factor``
and ``shift_factor``; SD's 0.18215 is ``1/std`` of its VAE's latents). A wrong,
hard-coded factor silently changes the noise level the diffusion model trains at, so
here the factors are measured on the data: :class:`LatentMoments` keeps per-channel
float64 sums over every latent element, all-reduced over ranks, from which

* ``latents_mean`` / ``latents_std``: per-channel mean and standard deviation
  (diffusers' per-channel ``latents_mean``/``latents_std`` config fields);
* ``shift_factor`` = the mean of all latent elements, ``scaling_factor`` = 1 / their
  standard deviation around it, so the normalized latents have mean 0 and std 1.

Which latents: the posterior mean (``mean``, deterministic) or a draw
``mu + exp(lv/2) * eps`` (``sample``, what the diffusion model sees when latents are
sampled); ``lv`` is ``soft_clamp_logvar(logvar)``, the variance the training op uses.
The noise of a draw is seeded by ``(seed, sample key)`` alone (:func:`keyed_noise`),
so a sample is the same whatever rank, batch or resumed run encodes it: 1 and 2
ranks measure the same statistics, and ``vae-train encode`` writes the same sample.

Used by ``vae-train latent-stats`` (:func:`latent_statistics_pass`), by training
validation (:func:`vae_train.evaluate.evaluate_stream` adds the posterior-mean
statistics it already sums) and by ``vae-train encode`` (the scaling factor it records).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from vae_train import distributed
from vae_train.errors import VaeTrainError
from vae_train.ops.reference import soft_clamp_logvar

LATENTS = ("mean", "sample")
"""Which latents the statistics describe: the posterior mean, or one posterior draw per image."""


class LatentError(VaeTrainError):
    """Latent statistics or encoding cannot run on the given input."""


# -- the posterior ---------------------------------------------------------------------------


@torch.no_grad()
def posterior(model: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, logvar)`` of q(z|x) as float32, ``logvar`` soft-clamped as the training op does.

    Any model with ``encode(x) -> (mu, logvar)`` works (every ``model.arch``).
    """
    mu, logvar = model.encode(x)
    return mu.float(), soft_clamp_logvar(logvar.float())


def _key_seed(seed: int, key: str) -> int:
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def keyed_noise(keys: Sequence[str], shape: Sequence[int], seed: int) -> torch.Tensor:
    """Standard-normal noise ``[len(keys), *shape]`` (float32, CPU), row i seeded by ``(seed, keys[i])`` only."""
    out = torch.empty((len(keys), *shape), dtype=torch.float32)
    generator = torch.Generator()
    for i, key in enumerate(keys):
        generator.manual_seed(_key_seed(seed, key))
        out[i].normal_(generator=generator)
    return out


def draw(mean: torch.Tensor, logvar: torch.Tensor, keys: Sequence[str], seed: int) -> torch.Tensor:
    """One posterior sample per image, ``mean + exp(logvar/2) * eps`` with :func:`keyed_noise` (float32)."""
    eps = keyed_noise(keys, mean.shape[1:], seed).to(mean.device)
    return mean + torch.exp(0.5 * logvar) * eps


# -- statistics ------------------------------------------------------------------------------


class LatentMoments:
    """Per-channel float64 count, sum and sum of squares of latents ``[B, C, ...]``.

    Sums, not running means, so shards of the data on different ranks combine
    exactly by one all-reduce (:meth:`all_reduced`), in any order up to rounding.
    """

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.sums = torch.zeros(3, channels, dtype=torch.float64)  # count, sum, sum of squares

    def add(self, z: torch.Tensor) -> None:
        """Add a batch ``[B, C, ...]``."""
        if z.dim() < 2 or z.shape[1] != self.channels:
            raise LatentError(f"latents of shape {tuple(z.shape)} do not have {self.channels} channels in dim 1")
        per_channel = z.detach().double().transpose(0, 1).reshape(self.channels, -1)
        self.sums[0] += per_channel.shape[1]
        self.sums[1] += per_channel.sum(1).cpu()
        self.sums[2] += per_channel.square().sum(1).cpu()

    def all_reduced(self) -> LatentMoments:
        """The sums over every rank (a collective: every rank calls it)."""
        reduced = LatentMoments(self.channels)
        reduced.sums = distributed.all_reduce_sum(self.sums.clone())
        return reduced

    def summary(self) -> dict[str, Any]:
        """See :func:`latent_statistics`."""
        return latent_statistics(self.sums[0], self.sums[1], self.sums[2])


def latent_statistics(count: torch.Tensor, total: torch.Tensor, total_sq: torch.Tensor) -> dict[str, Any]:
    """Per-channel and global statistics from per-channel float64 element counts, sums and sums of squares.

    Returns ``latents_mean``/``latents_std`` (lists, one per channel), ``mean``/``std``
    (over every element), ``shift_factor`` = ``mean`` and ``scaling_factor`` = ``1/std``
    (``(z - shift_factor) * scaling_factor`` has mean 0 and std 1). Standard deviations
    are population ones (divided by the count).
    """
    count, total, total_sq = (t.double() for t in (count, total, total_sq))
    if float(count.min()) <= 0:
        raise LatentError("no latents were measured: the data source yielded no images")
    mean_c = total / count
    std_c = (total_sq / count - mean_c.square()).clamp(min=0).sqrt()
    n = float(count.sum())
    mean = float(total.sum()) / n
    std = math.sqrt(max(float(total_sq.sum()) / n - mean * mean, 0.0))
    if not (math.isfinite(mean) and math.isfinite(std)):
        raise LatentError(f"the latents are not finite (mean {mean}, std {std}): the model diverged")
    if std == 0.0:
        raise LatentError("every latent element is equal (std 0): no scaling factor exists; is the model trained?")
    return {
        "latents_mean": mean_c.tolist(),
        "latents_std": std_c.tolist(),
        "mean": mean,
        "std": std,
        "shift_factor": mean,
        "scaling_factor": 1.0 / std,
        "elements": int(n),
    }


def statistics_scalars(stats: Mapping[str, Any], prefix: str = "latent_") -> dict[str, float]:
    """Flat scalars of a :func:`latent_statistics` dict (for TensorBoard): per-channel ones get ``_cN``."""
    out = {f"{prefix}scaling_factor": float(stats["scaling_factor"]),
           f"{prefix}shift_factor": float(stats["shift_factor"])}
    for c, (m, s) in enumerate(zip(stats["latents_mean"], stats["latents_std"])):
        out[f"{prefix}mean_c{c}"] = float(m)
        out[f"{prefix}std_c{c}"] = float(s)
    return out


@torch.no_grad()
def latent_statistics_pass(
    model: Any,
    batches: Iterable[Mapping[str, Any]],
    *,
    latents: str = "mean",
    max_images: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Latent statistics of ``model`` over a (per-rank) stream, reduced over every rank.

    ``batches`` yields ``image`` ``[B, C, H, W]``, ``key`` and optionally ``mask`` (as
    :func:`vae_train.data.build_val_stream` does). ``max_images`` > 0 measures the first
    ``max_images`` images of the split whatever the number of ranks: a validation
    stream (it has ``num_samples``) gives rank r the positions
    ``[r*T//R, (r+1)*T//R)``, so rank r takes the part of ``[0, max_images)`` inside
    them; another iterable takes an even share per rank. Every rank gets the same
    dict: :func:`latent_statistics` plus ``images`` and ``latents``.
    """
    if latents not in LATENTS:
        raise LatentError(f"latents must be one of {', '.join(LATENTS)}, got {latents!r}")
    if max_images < 0:
        raise LatentError(f"--max-images must be >= 0 (0 = all), got {max_images}")
    rank, world = distributed.rank(), distributed.world_size()
    quota = _quota(max_images, getattr(batches, "num_samples", None), rank, world) if max_images else None
    device = next(model.parameters()).device
    moments: LatentMoments | None = None
    images = 0
    for batch in batches:
        if quota is not None and images >= quota:
            break
        x, keys = batch["image"], list(batch["key"])
        mask = batch.get("mask")
        if mask is not None:
            keep = torch.as_tensor(mask, dtype=torch.bool)
            x, keys = x[keep], [k for k, m in zip(keys, keep.tolist()) if m]
        if quota is not None:
            x, keys = x[: quota - images], keys[: quota - images]
        if not keys:
            continue
        mean, logvar = posterior(model, x.to(device))
        z = mean if latents == "mean" else draw(mean, logvar, keys, seed)
        if moments is None:
            moments = LatentMoments(z.shape[1])
        moments.add(z)
        images += len(keys)
    channels = distributed.all_gather_json(moments.channels if moments is not None else None)
    known = [c for c in channels if c is not None]
    if not known:
        raise LatentError("the data source yielded no images; check --data (is the split empty?)")
    reduced = (moments or LatentMoments(known[0])).all_reduced()
    count = distributed.all_reduce_sum(torch.tensor([float(images)], dtype=torch.float64))
    return {"images": int(count.item()), "latents": latents, **reduced.summary()}


def _quota(max_images: int, total: int | None, rank: int, world: int) -> int:
    """Images rank ``rank`` measures so that all ranks together measure the split's first ``max_images``."""
    if total is None:
        return (rank + 1) * max_images // world - rank * max_images // world
    start, end = rank * total // world, (rank + 1) * total // world
    return max(0, min(max_images, end) - start)
