"""Reconstruction metrics of a whole split: PSNR, SSIM, LPIPS, rFID, under one fixed protocol.

``vae-train eval --metrics`` and training validation (``eval.metrics``) both use
:class:`ReconstructionMetrics`, so the two report the same numbers. rFID figures
drift apart when the protocol does (guided-diffusion#161: resize, PNG round
trip), so the protocol is fixed here and stated in the README:

1. **uint8 round trip.** Inputs and reconstructions are mapped from the model's
   value range to [0, 1], clamped, and rounded to 8 bits (``round(255 x)``), as
   if both were saved as PNG; every metric sees these 8-bit images.
2. **PSNR / SSIM** (:func:`vae_train.evaluate.psnr` / :func:`~vae_train.evaluate.ssim`)
   on the 8-bit images scaled to [0, 1], in the model's channels; the mean over images.
3. **LPIPS** (the module of :mod:`vae_train.model.perceptual`) on the 8-bit images
   scaled to [-1, 1]; grayscale repeated to RGB; the mean over images.
4. **rFID**: the Frechet distance between the Inception pool features (2048-d,
   :class:`vae_train.model.inception.FIDInceptionV3`: bilinear resize to 299x299,
   no antialiasing, as pytorch-fid; non-square images are stretched, as there) of the
   inputs and of their reconstructions, grayscale repeated to RGB. torchmetrics' ``FrechetInceptionDistance`` keeps the
   feature statistics (float64 sum, sum of outer products, count) and computes the
   distance; the statistics are all-reduced here in float64 (one collective), so
   any number of ranks gives the same figure as one. With fewer images than
   features (2048) the covariances are rank-deficient and rFID is biased upwards:
   compare figures only at the same number of images (reported as ``rfid_images``).

Likelihood terms (ELBO, bits/dim) are not here: they belong to likelihood models
(:func:`vae_train.evaluate.evaluate_stream`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vae_train import distributed
from vae_train.errors import VaeTrainError

METRICS = ("psnr", "ssim", "lpips", "rfid")
DEFAULT_METRICS = ("psnr", "ssim")
_PER_IMAGE = ("psnr", "ssim", "lpips")  # means over images; rFID is a property of the whole set


class MetricsError(VaeTrainError):
    """A metric that cannot be computed as asked (unknown name, missing weights, too few images)."""


def parse_metrics(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"psnr,ssim,rfid"`` (or a list) -> validated names in the given order; empty is allowed."""
    names = [n.strip().lower() for n in (value.split(",") if isinstance(value, str) else value)]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise MetricsError(f"unknown reconstruction metric(s) {unknown}; choose from {', '.join(METRICS)}")
    if len(set(names)) != len(names):
        raise MetricsError(f"a reconstruction metric is listed twice in {names}")
    return tuple(names)


def to_uint8(images: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """Images in ``value_range`` -> ``uint8`` (clamped, rounded): the round trip every metric sees."""
    lo, hi = value_range
    unit = ((images.detach().double() - lo) / (hi - lo)).clamp(0.0, 1.0)
    return torch.round(unit * 255.0).to(torch.uint8)


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """``[B, 1|3, H, W]`` -> ``[B, 3, H, W]`` (grayscale repeated): Inception and LPIPS take RGB."""
    channels = images.shape[1]
    if channels == 3:
        return images
    if channels == 1:
        return images.expand(-1, 3, -1, -1)
    raise MetricsError(f"LPIPS and rFID need grayscale or RGB images, these have {channels} channels; "
                       "evaluate them with psnr,ssim only")


@dataclass
class Extractors:
    """The networks the selected metrics need (loaded once, reused by every evaluation)."""

    inception: nn.Module | None = None
    lpips: nn.Module | None = None


def build_extractors(metrics: Sequence[str], *, inception_weights: str = "", lpips_backbone_path: str = "",
                     device: torch.device | str = "cpu") -> Extractors:
    """Load the Inception network (for ``rfid``) and LPIPS (for ``lpips``) from local files only.

    Called at start-up, so missing weights fail before any image is evaluated or any step trained.
    """
    extractors = Extractors()
    if "rfid" in metrics:
        from vae_train.model.inception import load_fid_inception

        extractors.inception = load_fid_inception(inception_weights or None, device)
    if "lpips" in metrics:
        from vae_train.model.perceptual import build_lpips

        extractors.lpips = build_lpips(lpips_backbone_path).to(device).eval()
    return extractors


def _device_of(module: nn.Module | None) -> torch.device:
    """Where a metric network's weights live (the CPU for one without parameters)."""
    first = next(iter(module.parameters()), None) if module is not None else None
    return first.device if first is not None else torch.device("cpu")


def _full_precision(device: torch.device) -> torch.autocast:
    """The metric networks run in float32 even inside the trainer's bf16/fp16 autocast: features
    rounded to 8 bits of mantissa would move rFID by more than the differences it is read for."""
    return torch.autocast(device.type, enabled=False)


class ReconstructionMetrics:
    """Accumulates the selected metrics over batches; :meth:`compute` reduces over ranks.

    One instance per evaluation: every rank must call :meth:`compute` (one all-reduce, plus
    one for rFID), which reduces the state in place, so later calls return the same result.
    """

    def __init__(self, metrics: Sequence[str] = DEFAULT_METRICS, extractors: Extractors | None = None) -> None:
        self.metrics = parse_metrics(metrics)
        extractors = extractors or Extractors()
        if "lpips" in self.metrics and extractors.lpips is None:
            raise MetricsError("the lpips metric needs the LPIPS network (build_extractors)")
        if "rfid" in self.metrics and extractors.inception is None:
            raise MetricsError("the rfid metric needs the FID Inception network (build_extractors)")
        self._lpips = extractors.lpips
        self._sums = torch.zeros(len(_PER_IMAGE) + 1, dtype=torch.float64)  # per-image sums, then the count
        self._fid: Any = None
        self._result: dict[str, float] | None = None
        if "rfid" in self.metrics:
            from torchmetrics.image.fid import FrechetInceptionDistance

            inception = extractors.inception
            self._fid = FrechetInceptionDistance(feature=inception, sync_on_compute=False)
            self._fid.to(_device_of(inception))

    @torch.no_grad()
    def update(self, target: torch.Tensor, recon: torch.Tensor, value_range: tuple[float, float]) -> None:
        """Add a batch of inputs and their reconstructions, both ``[B, C, H, W]`` in ``value_range``."""
        if target.shape != recon.shape:
            raise MetricsError(f"inputs {tuple(target.shape)} and reconstructions {tuple(recon.shape)} differ in shape")
        if self._result is not None:
            raise MetricsError("this evaluation was already computed; start a new ReconstructionMetrics")
        if target.shape[0] == 0:
            return
        from vae_train.evaluate import psnr, ssim

        real8, fake8 = to_uint8(target, value_range), to_uint8(recon, value_range)
        real, fake = real8.double() / 255.0, fake8.double() / 255.0
        if "psnr" in self.metrics:
            self._sums[0] += psnr(fake, real).sum().cpu()
        if "ssim" in self.metrics:
            self._sums[1] += ssim(fake, real).sum().cpu()
        if self._lpips is not None:
            device = _device_of(self._lpips)
            x = as_rgb(real).float().to(device) * 2 - 1
            y = as_rgb(fake).float().to(device) * 2 - 1
            with _full_precision(device):
                self._sums[2] += self._lpips(x, y).double().sum().cpu()
        if self._fid is not None:
            device = self._fid.real_features_sum.device
            with _full_precision(device):
                self._fid.update(as_rgb(real8).to(device), real=True)
                self._fid.update(as_rgb(fake8).to(device), real=False)
        self._sums[-1] += target.shape[0]

    def compute(self) -> dict[str, float]:
        """The metrics of everything every rank added: ``psnr_db``, ``ssim``, ``lpips``, ``rfid``, ``rfid_images``."""
        if self._result is not None:
            return dict(self._result)
        sums = distributed.all_reduce_sum(self._sums)
        count = float(sums[-1])
        out: dict[str, float] = {}
        names = {"psnr": "psnr_db", "ssim": "ssim", "lpips": "lpips"}
        for i, metric in enumerate(_PER_IMAGE):
            if metric in self.metrics and count > 0:
                out[names[metric]] = float(sums[i]) / count
        if self._fid is not None:
            out.update(rfid=self._frechet_distance(), rfid_images=int(self._fid.real_features_num_samples))
        self._result = out
        return dict(out)

    def _frechet_distance(self) -> float:
        """All-reduce torchmetrics' FID state in float64, then let it compute the distance."""
        fid = self._fid
        names = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples",
                 "fake_features_sum", "fake_features_cov_sum", "fake_features_num_samples")
        states = [getattr(fid, name) for name in names]
        packed = torch.cat([s.detach().double().flatten().cpu() for s in states])
        packed = distributed.all_reduce_sum(packed)
        offset = 0
        for name, state in zip(names, states):
            part = packed[offset : offset + state.numel()].view_as(state)
            setattr(fid, name, part.to(dtype=state.dtype, device=state.device))
            offset += state.numel()
        n = int(fid.real_features_num_samples)
        if n < 2:
            raise MetricsError(f"rFID needs at least 2 images, the split gave {n}")
        # compute() casts to the dtype of the last update's features, an attribute a rank without images
        # lacks: keep the float64 result on every rank.
        fid.orig_dtype = torch.float64
        return float(fid.compute())
