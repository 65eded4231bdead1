"""Evaluation metrics of a trained VAE: ELBO, importance-weighted NLL, active units, PSNR/SSIM, AUROC.

Everything here is a plain function of a model and tensors (no CLI, no I/O), used
by ``vae-train eval``/``score``, by training validation (:func:`evaluate_stream`)
and by ``benchmarks/quality.py``, so all three report the same numbers.

* Negative ELBO per image, ``recon_nll + KL`` in nats, and in bits per dimension
  (``vae_train.model.bits_per_dim``; D = pixels x channels the likelihood scores).
* Importance-weighted NLL (Burda et al. 2016, the IWAE bound):
  ``-log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x)`` with ``z_k ~ q(z|x)``. It is an
  upper bound on ``-log p(x)`` that tightens as K grows; K=1 is the one-sample
  ELBO estimate. The K samples are drawn in chunks (``iw_batch_size`` decoder
  evaluations at a time) and combined with a running log-sum-exp, so K=1000 needs
  the memory of one chunk.
* Active units (Burda et al. 2016): a latent unit ``u`` is active when
  ``Cov_x(E_q[u|x]) = Var_x(mu_u) > 0.01``; a latent channel is counted active when
  the mean over its positions of ``Var_x(mu)`` exceeds the threshold.
* PSNR and SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1=0.01,
  K2=0.03), and optionally LPIPS and rFID, of the deterministic reconstruction
  ``mean(decode(mu))`` against the input, under the protocol of
  :mod:`vae_train.recon_metrics` (uint8 round trip first).
* AUROC and average precision (AUPRC) of anomaly scores, with the same tie
  handling as scikit-learn's ``roc_auc_score`` / ``average_precision_score``.

Distributed evaluation: :func:`evaluate_stream` keeps float64 *sums*, and when a
process group is up it all-reduces them once at the end, so each rank evaluates
its own share of the stream (batches carry a ``mask`` for padding) and every
sample counts exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vae_train import distributed
from vae_train.errors import VaeTrainError
from vae_train.latents import LatentError, latent_statistics, statistics_scalars
from vae_train.model import VAE, VAE_TYPES, bits_per_dim
from vae_train.ops.reference import soft_clamp_logvar
from vae_train.recon_metrics import ReconstructionMetrics

_PSNR_MIN_MSE = 1e-10  # a perfect reconstruction reports 100 dB instead of infinity


class EvalError(VaeTrainError):
    """Evaluation cannot run on the given input (empty data, K=0, mismatched checkpoint...)."""


# -- numerics -----------------------------------------------------------------------


# Decoder activations (float32) that one chunk of the IWAE bound may hold. Measured on a 2-core CPU
# (docs/DESIGN.md "IWAE evaluation"): per-latent time is flat from ~16 to ~256 latents for the compact
# decoder and grows beyond a few MB of activations (allocation and cache misses), so the chunk is sized
# to the model's activation footprint rather than fixed.
IW_CHUNK_BYTES = 8 * 2**20


@torch.no_grad()
def auto_iw_batch_size(model: ConvVAE, budget_bytes: int = IW_CHUNK_BYTES) -> int:
    """Latents the IWAE bound decodes at once for ``model``: ``budget_bytes`` of decoder activations.

    One latent goes through the decoder with hooks that add up every layer's output
    size (float32): the footprint of one decoder pass, which is what grows with the
    chunk. Clamped to [16, 4096].
    """
    total = 0

    def count(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel()

    leaves = [m for m in model.decoder.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        param = next(model.decoder.parameters())
        model.decoder(torch.zeros((1, *model.latent_shape), dtype=param.dtype, device=param.device))
    finally:
        for handle in handles:
            handle.remove()
    return int(min(4096, max(16, budget_bytes // max(1, 4 * total))))


@torch.no_grad()
def iw_nll(
    model: VAE,
    x: torch.Tensor,
    num_samples: int,
    *,
    iw_batch_size: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Importance-weighted NLL (nats) per image with ``num_samples`` samples: shape ``[B]``, float64.

    The posterior is ``N(mu, exp(soft_clamp_logvar(logvar)))``, the same clamp the
    reparameterization op applies in training. At most ``iw_batch_size`` latents are
    decoded at once (at least one per image), whatever ``num_samples`` is; ``None``
    sizes the chunk from the model (:func:`auto_iw_batch_size`). An autoregressive
    decoder's z-independent part (:meth:`ConvVAE.context`) is computed once per image,
    so each sample costs one plain decoder pass.
    """
    if num_samples < 1:
        raise EvalError(f"the number of importance samples must be >= 1, got {num_samples}; use --iw-samples K with K >= 1")
    if iw_batch_size is None:
        iw_batch_size = auto_iw_batch_size(model)
    mu, logvar = model.encode(x)
    target = model.target(x)
    context = model.context(target)
    lv = soft_clamp_logvar(logvar.float())
    std = torch.exp(0.5 * lv)
    mu32 = mu.float()
    batch = x.shape[0]
    chunk = max(1, iw_batch_size // batch)
    total = torch.full((batch,), -math.inf, dtype=torch.float64, device=mu.device)
    done = 0
    while done < num_samples:
        m = min(chunk, num_samples - done)
        eps = torch.randn((m, *mu.shape), generator=generator, device=mu.device, dtype=torch.float32)
        z = mu32 + std * eps
        # log p(z) - log q(z|x) for standard-normal prior and diagonal posterior (constants cancel).
        log_prior_ratio = (0.5 * (eps.square() - z.square()) + 0.5 * lv).flatten(2).sum(2)
        params = model.decode(z.flatten(0, 1).to(mu.dtype), context=context)
        repeated = target.unsqueeze(0).expand(m, *target.shape).flatten(0, 1)
        log_px = model.likelihood.log_prob(repeated, params).view(m, batch)
        log_w = (log_px + log_prior_ratio).double()
        total = torch.logaddexp(total, torch.logsumexp(log_w, dim=0))
        done += m
    return -(total - math.log(num_samples))


def _gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    """A normalized 2-D Gaussian kernel ``[1, 1, size, size]`` (float64)."""
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).view(1, 1, size, size)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM per image of ``[B, C, H, W]`` batches (Wang et al. 2004), float64 ``[B]``.

    Gaussian-weighted local statistics over the positions where the whole window
    fits (as scikit-image's ``structural_similarity(gaussian_weights=True,
    use_sample_covariance=False)``), averaged over positions and channels. Images
    smaller than the window use the largest odd window that fits.
    """
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"ssim needs two [B, C, H, W] batches of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    side = min(window, a.shape[-1], a.shape[-2])
    side -= 1 - side % 2  # odd
    kernel = _gaussian_window(side, sigma, a.device)
    c = a.shape[1]
    x = a.double().flatten(0, 1).unsqueeze(1)
    y = b.double().flatten(0, 1).unsqueeze(1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s_map.flatten(1).mean(1).view(-1, c).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB per image of ``[B, ...]`` batches: ``10 log10(range^2 / MSE)``, float64 ``[B]``."""
    mse = (a.double() - b.double()).square().flatten(1).mean(1).clamp(min=_PSNR_MIN_MSE)
    return 10.0 * torch.log10(data_range**2 / mse)


def _ranking_inputs(scores: Any, is_anomaly: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(is_anomaly).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; map them to +inf (most anomalous) or drop them explicitly")
    if y.all() or not y.any():
        raise ValueError("AUROC/AUPRC need both normal and anomalous samples")
    return s, y


def auroc(scores: Any, is_anomaly: Any) -> float:
    """Area under the ROC curve (higher score = more anomalous), ties counted as half.

    Via the Mann-Whitney statistic with average ranks, which equals the
    trapezoidal ROC area scikit-learn computes.
    """
    s, y = _ranking_inputs(scores, is_anomaly)
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # average rank (1-based) within each group of tied scores
    starts = np.r_[0, np.flatnonzero(sorted_s[1:] != sorted_s[:-1]) + 1]  # != keeps +inf ties together
    ends = np.r_[starts[1:], len(s)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + 1 + end) / 2.0
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auprc(scores: Any, is_anomaly: Any) -> float:
    """Average precision: ``sum_n (R_n - R_{n-1}) P_n`` over distinct score thresholds (as scikit-learn)."""
    s, y = _ranking_inputs(scores, is_anomaly)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_ties = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]
    tps = np.cumsum(y)[last_of_ties]
    fps = (last_of_ties + 1) - tps
    precision = tps / (tps + fps)
    recall = tps / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


# -- per-image scores and whole-stream evaluation ---------------------------------------


def _unwrap(model: Any) -> VAE:
    """The VAE (ConvVAE or AutoencoderKL) inside a DeepSpeed engine / DDP wrapper (their ``.module``), or the model itself."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, VAE_TYPES):
        raise EvalError(f"expected a ConvVAE or AutoencoderKL (or a wrapper with .module), got {type(inner).__name__}")
    return inner


@torch.no_grad()
def score_images(
    model: VAE,
    x: torch.Tensor,
    iw_samples: int = 0,
    *,
    iw_batch_size: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Per-image terms (float64 ``[B]``): ``nelbo``, ``recon``, ``kl`` (nats), ``iw_nll`` when
    ``iw_samples > 0``; plus ``mu`` (the posterior means, for active units), ``target`` (the
    images the likelihood scores) and ``reconstruction`` (``mean(decode(mu, target))``), both in the
    likelihood's value range, for the reconstruction metrics.

    The IWAE bound draws its noise first, so on a fresh ``generator`` it equals
    ``iw_nll(model, x, K, generator=...)`` with the same seed (``vae-train eval`` and
    ``score`` report what the library call gives)."""
    bound = iw_nll(model, x, iw_samples, iw_batch_size=iw_batch_size, generator=generator) if iw_samples > 0 else None
    out = model(x, generator=generator)
    target = model.target(x)
    scores = {
        "recon": out.recon_nll.double(),
        "kl": out.kl.double(),
        "nelbo": out.nelbo.double(),
        "mu": out.mu.double(),
        "target": target,
        "reconstruction": model.likelihood.mean(model.decode(out.mu, target)),
    }
    if bound is not None:
        scores["iw_nll"] = bound
    return scores


_SUMMED = ("recon", "kl", "nelbo", "iw_nll")
_OFFSET = 3 + len(_SUMMED)


def _skipped_by_stream(batches: Any) -> dict[str, int]:
    """Samples the data stream masked out (damaged, wrong size...) by reason, when it keeps stats."""
    stats = getattr(batches, "stats", None)
    if not callable(stats):
        return {}
    return {str(k): int(v) for k, v in stats().get("skipped", {}).items()}


def evaluate_stream(
    model: Any,
    batches: Iterable[Mapping[str, Any]],
    iw_samples: int = 0,
    *,
    max_batches: int = 0,
    iw_batch_size: int | None = None,
    active_threshold: float = 0.01,
    seed: int = 0,
    image_hw: tuple[int, int] | None = None,
    recon_metrics: ReconstructionMetrics | None = None,
) -> dict[str, float]:
    """Evaluate ``model`` on a stream of batches; returns the metrics of the whole split.

    ``batches`` yields dicts with ``image`` ``[B, C, H, W]`` (in the likelihood's range)
    and optionally ``mask`` (bool ``[B]``, False for padding samples, which are
    ignored). ``max_batches`` > 0 stops each rank after that many batches. Under
    ``torch.distributed`` every rank must call this (one all-reduce at the end);
    every rank gets the same dict.

    Keys: ``images``; ``nelbo_nats``, ``recon_nats``, ``kl_nats`` and their ``*_bpd``;
    ``iw_nll_nats``, ``iw_nll_bpd``, ``iw_samples`` (when ``iw_samples > 0``);
    ``active_units``/``latent_units`` and ``active_channels``/``latent_channels``;
    the reconstruction metrics of ``recon_metrics`` (default: ``psnr_db`` and ``ssim``;
    see :class:`vae_train.recon_metrics.ReconstructionMetrics` for ``lpips``, ``rfid``,
    ``rfid_images``), over the images with a finite score; ``nonfinite_images`` (images whose negative ELBO or IW
    NLL is not finite: excluded from the means and counted here, never hidden);
    ``skipped_samples`` (samples the stream masked out as damaged or mis-sized, when
    it reports them through a ``stats()`` method like :class:`vae_train.data.ValStream`);
    the posterior-mean latent statistics of :mod:`vae_train.latents` as scalars
    (``latent_scaling_factor``, ``latent_shift_factor``, ``latent_mean_cN``, ``latent_std_cN``).
    ``image_hw`` (H, W) is the size of the stream's images when it is not the model's
    ``image_size`` (larger images, tiled with :meth:`ConvVAE.enable_tiling`): the latent
    units and bits/dim are counted for that size.
    """
    vae = _unwrap(model)
    latent_shape = vae.latent_shape if image_hw is None else vae.latent_shape_for(image_hw)
    num_dims = vae.num_dims if image_hw is None else vae.num_dims_for(image_hw)
    if iw_samples < 0:
        raise EvalError(f"iw_samples must be >= 0 (0 = no importance sampling), got {iw_samples}")
    device = next(vae.parameters()).device
    recon_metrics = recon_metrics or ReconstructionMetrics()
    generator = torch.Generator(device=device).manual_seed(seed + distributed.rank())
    latent_numel = math.prod(latent_shape)
    # sums layout: [finite count, nonfinite count, skipped samples, one sum per _SUMMED key, mu sums, mu^2 sums]
    sums = torch.zeros(_OFFSET + 2 * latent_numel, dtype=torch.float64)
    was_training = vae.training
    vae.eval()
    try:
        for index, batch in enumerate(batches):
            if max_batches and index >= max_batches:
                break
            x = batch["image"]
            mask = batch.get("mask")
            if mask is not None:
                x = x[torch.as_tensor(mask, dtype=torch.bool)]
            if x.shape[0] == 0:
                continue
            scores = score_images(vae, x.to(device), iw_samples, iw_batch_size=iw_batch_size, generator=generator)
            finite = torch.isfinite(scores["nelbo"])
            if iw_samples > 0:
                finite &= torch.isfinite(scores["iw_nll"])
            finite = finite.cpu()
            sums[0] += finite.sum()
            sums[1] += (~finite).sum()
            for i, key in enumerate(_SUMMED):
                if key in scores:
                    sums[3 + i] += scores[key].cpu()[finite].sum()
            keep = finite.to(scores["target"].device)
            recon_metrics.update(scores["target"][keep], scores["reconstruction"][keep], vae.likelihood.value_range)
            mu = scores["mu"].cpu()[finite].flatten(1)
            sums[_OFFSET : _OFFSET + latent_numel] += mu.sum(0)
            sums[_OFFSET + latent_numel :] += mu.square().sum(0)
    finally:
        vae.train(was_training)
    skipped = _skipped_by_stream(batches)
    sums[2] = sum(skipped.values())
    sums = distributed.all_reduce_sum(sums)
    if int(sums[0]) == 0 and int(sums[2]) > 0:
        raise EvalError(
            f"every sample of the evaluation stream was skipped ({int(sums[2])} in all; on this rank by reason: "
            f"{skipped}); the data does not fit the model (model.image_size={vae.config.image_size}, "
            f"model.in_channels={vae.config.in_channels}): evaluate on matching data, or set data.resize=true"
        )
    metrics = _summarize(sums, iw_samples, active_threshold, latent_shape, num_dims)
    metrics.update(recon_metrics.compute())  # every rank: it all-reduces
    return metrics


def _summarize(sums: torch.Tensor, iw_samples: int, active_threshold: float, latent_shape: tuple[int, ...],
               num_dims: int) -> dict[str, float]:
    """Turn the reduced sums into the metrics dict of :func:`evaluate_stream`."""
    count, nonfinite = int(sums[0]), int(sums[1])
    if count == 0:
        if nonfinite:
            raise EvalError(f"all {nonfinite} evaluated images have a non-finite negative ELBO: the model diverged")
        raise EvalError("the evaluation stream yielded no images; check the data source (is the split empty?)")
    means = {key: float(sums[3 + i]) / count for i, key in enumerate(_SUMMED)}
    d = num_dims
    metrics: dict[str, float] = {
        "images": count,
        "nelbo_nats": means["nelbo"],
        "nelbo_bpd": bits_per_dim(means["nelbo"], d),
        "recon_nats": means["recon"],
        "recon_bpd": bits_per_dim(means["recon"], d),
        "kl_nats": means["kl"],
        "kl_bpd": bits_per_dim(means["kl"], d),
    }
    if iw_samples > 0:
        metrics.update(iw_nll_nats=means["iw_nll"], iw_nll_bpd=bits_per_dim(means["iw_nll"], d), iw_samples=iw_samples)
    units = math.prod(latent_shape)
    mean_mu = sums[_OFFSET : _OFFSET + units] / count
    var_mu = (sums[_OFFSET + units :] / count - mean_mu.square()).clamp(min=0.0)
    per_channel = var_mu.view(latent_shape[0], -1).mean(1)
    metrics.update(
        active_units=int((var_mu > active_threshold).sum()),
        latent_units=units,
        active_channels=int((per_channel > active_threshold).sum()),
        latent_channels=latent_shape[0],
        nonfinite_images=nonfinite,
        skipped_samples=int(sums[2]),
    )
    metrics.update(_latent_scalars(latent_shape, sums, count))
    return metrics


def _latent_scalars(latent_shape: tuple[int, ...], sums: torch.Tensor, count: int) -> dict[str, float]:
    """Posterior-mean statistics (``latent_scaling_factor``, ``latent_shift_factor``, per-channel
    ``latent_mean_cN``/``latent_std_cN``) from the mu sums already kept for active units."""
    channels = latent_shape[0]
    units = math.prod(latent_shape)
    per_channel = sums[_OFFSET:].view(2, channels, units // channels).sum(2)
    try:
        stats = latent_statistics(torch.full((channels,), float(count * (units // channels)), dtype=torch.float64),
                                  per_channel[0], per_channel[1])
    except LatentError:  # constant latents: no factor to report (validation goes on)
        return {}
    return statistics_scalars(stats)
