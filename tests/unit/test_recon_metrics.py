"""Reconstruction metrics: the uint8 protocol, PSNR against scikit-image, rFID against scipy ``sqrtm``,
and the FID Inception network's loading rules (random weights saved to a file: the real file is never
downloaded here)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from vae_train.model.errors import ModelError
from vae_train.model.inception import FID_WEIGHTS_NAME, FIDInceptionV3, load_fid_inception
from vae_train.recon_metrics import (
    Extractors,
    MetricsError,
    ReconstructionMetrics,
    build_extractors,
    parse_metrics,
    to_uint8,
)


class PixelFeatures(torch.nn.Module):
    """A real, simple feature extractor for the rFID statistics: a fixed random projection of the
    uint8 pixels (as the Inception network, it takes uint8 RGB)."""

    def __init__(self, pixels: int, features: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(pixels, features, bias=False)
        self.num_features = features  # tells torchmetrics the size (else it probes with a 299x299 image)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        return self.proj(images.flatten(1).float() / 255.0)


def _frechet_scipy(a: np.ndarray, b: np.ndarray) -> float:
    """The FID formula with scipy's matrix square root (the reference of pytorch-fid / the TF code)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_parse_metrics() -> None:
    assert parse_metrics("psnr, SSIM,rfid") == ("psnr", "ssim", "rfid")
    assert parse_metrics("") == ()
    with pytest.raises(MetricsError, match="unknown.*'fid'.*psnr, ssim, lpips, rfid"):
        parse_metrics("psnr,fid")
    with pytest.raises(MetricsError, match="twice"):
        parse_metrics(["psnr", "psnr"])


def test_uint8_round_trip_hand_checked() -> None:
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.7])
    assert to_uint8(x, (-1.0, 1.0)).tolist() == [0, 0, 128, 191, 255, 255]  # 127.5 rounds half to even
    assert to_uint8(torch.tensor([0.2, 0.6]), (0.0, 1.0)).tolist() == [51, 153]


def test_psnr_and_ssim_follow_the_uint8_protocol() -> None:
    """The means over images equal scikit-image's metrics of the 8-bit images."""
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(5, 3, 32, 24, generator=gen) * 2 - 1
    recon = (target + 0.1 * torch.randn(target.shape, generator=gen)).clamp(-1.2, 1.2)
    metrics = ReconstructionMetrics(("psnr", "ssim"))
    metrics.update(target[:2], recon[:2], (-1.0, 1.0))
    metrics.update(target[2:], recon[2:], (-1.0, 1.0))
    got = metrics.compute()
    t8, r8 = to_uint8(target, (-1, 1)).numpy(), to_uint8(recon, (-1, 1)).numpy()
    psnrs = [peak_signal_noise_ratio(t, r, data_range=255) for t, r in zip(t8, r8)]
    ssims = [structural_similarity(t, r, data_range=255, channel_axis=0, gaussian_weights=True, sigma=1.5,
                                   use_sample_covariance=False) for t, r in zip(t8, r8)]
    assert got["psnr_db"] == pytest.approx(np.mean(psnrs), rel=1e-9)
    assert got["ssim"] == pytest.approx(np.mean(ssims), rel=1e-6)
    assert set(got) == {"psnr_db", "ssim"}


def test_rfid_matches_scipy_sqrtm() -> None:
    """Batches of images -> features -> float64 statistics -> distance, against numpy + scipy.linalg.sqrtm."""
    gen = torch.Generator().manual_seed(1)
    target = torch.rand(300, 1, 4, 4, generator=gen)  # grayscale: repeated to RGB for the extractor
    recon = (0.8 * target + 0.1 + 0.05 * torch.randn(target.shape, generator=gen)).clamp(0, 1)
    torch.manual_seed(2)
    features = PixelFeatures(3 * 16, 24)
    metrics = ReconstructionMetrics(("rfid",), Extractors(inception=features))
    for start in range(0, 300, 64):
        metrics.update(target[start : start + 64], recon[start : start + 64], (0.0, 1.0))
    got = metrics.compute()
    with torch.no_grad():
        feats = [features(to_uint8(x, (0, 1)).expand(-1, 3, -1, -1)).double().numpy() for x in (target, recon)]
    expected = _frechet_scipy(*feats)
    assert got["rfid_images"] == 300
    assert expected > 0.01  # the reconstructions really differ
    assert got["rfid"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert metrics.compute() == got  # computed once: a second call does not reduce the state again
    with pytest.raises(MetricsError, match="already computed"):
        metrics.update(target[:2], recon[:2], (0.0, 1.0))
    identical = ReconstructionMetrics(("rfid",), Extractors(inception=features))
    identical.update(target, target, (0.0, 1.0))
    assert abs(identical.compute()["rfid"]) < 1e-6


def test_lpips_follows_the_uint8_protocol(random_vgg16) -> None:
    """The mean LPIPS equals the LPIPS module's distances of the 8-bit images in [-1, 1] (grayscale as RGB)."""
    from vae_train.model.perceptual import build_lpips

    gen = torch.Generator().manual_seed(4)
    target = torch.rand(6, 1, 32, 32, generator=gen)
    recon = (target + 0.2 * torch.randn(target.shape, generator=gen)).clamp(0, 1)
    extractors = build_extractors(("lpips",), lpips_backbone_path=str(random_vgg16))
    metrics = ReconstructionMetrics(("lpips", "psnr"), extractors)
    metrics.update(target[:4], recon[:4], (0.0, 1.0))
    metrics.update(target[4:], recon[4:], (0.0, 1.0))
    got = metrics.compute()
    lpips = build_lpips(str(random_vgg16))
    as_net = lambda x: (to_uint8(x, (0, 1)).float() / 255 * 2 - 1).expand(-1, 3, -1, -1)  # noqa: E731
    with torch.no_grad():
        expected = lpips(as_net(target), as_net(recon)).double().mean().item()
    assert expected > 0
    assert got["lpips"] == pytest.approx(expected, rel=1e-5)
    assert set(got) == {"lpips", "psnr_db"}


def test_rfid_needs_two_images_and_the_network() -> None:
    with pytest.raises(MetricsError, match="FID Inception"):
        ReconstructionMetrics(("rfid",))
    with pytest.raises(MetricsError, match="LPIPS"):
        ReconstructionMetrics(("lpips",))
    metrics = ReconstructionMetrics(("rfid",), Extractors(inception=PixelFeatures(3 * 16, 8)))
    metrics.update(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4), (0.0, 1.0))
    with pytest.raises(MetricsError, match="at least 2 images"):
        metrics.compute()
    with pytest.raises(MetricsError, match="grayscale or RGB"):
        metrics.update(torch.rand(2, 2, 4, 4), torch.rand(2, 2, 4, 4), (0.0, 1.0))


def test_fid_inception_has_the_published_layout() -> None:
    """torchvision's inception_v3(num_classes=1008, aux_logits=False), which the weights file fits, has
    23,850,960 parameters in 94 conv + batch-norm units; the 2048-d pool comes out for any input size."""
    net = FIDInceptionV3()
    assert sum(p.numel() for p in net.parameters()) == 23_850_960
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == 94
    assert not net.train().training  # a fixed extractor stays in eval mode


def test_load_fid_inception_from_a_file_and_the_cache(inception_weights, tmp_path, monkeypatch) -> None:
    net = load_fid_inception(inception_weights)
    assert not net.published_weights  # the right name, but not the published file's SHA-256
    saved = torch.load(inception_weights, weights_only=True)
    torch.testing.assert_close(net.Mixed_7c.branch_pool.bn.running_var, saved["Mixed_7c.branch_pool.bn.running_var"])
    gen = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (2, 3, 40, 30), dtype=torch.uint8, generator=gen)
    feats = net(images)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    assert feats.std(0).mean() > 0  # two different images, two different feature vectors
    # pytorch-fid's protocol: bilinear to 299x299 without antialiasing, then [-1, 1]; a 299 image is not resized
    resized = torch.nn.functional.interpolate(images.float() / 255, size=(299, 299), mode="bilinear",
                                              align_corners=False)
    as_299 = torch.round(resized * 255).to(torch.uint8)
    # only the 8-bit rounding of the resized image differs (align_corners=True moves them ~50x more)
    assert (net(as_299) - feats).abs().max() < 0.05 * (feats[0] - feats[1]).abs().max()
    with pytest.raises(ModelError, match="uint8 RGB"):
        net(images.float())
    # no path: pytorch-fid's cache under $TORCH_HOME
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(ModelError, match=f"{FID_WEIGHTS_NAME}.*cache.*never downloaded"):
        load_fid_inception(None)
    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / FID_WEIGHTS_NAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(inception_weights.read_bytes())
    torch.testing.assert_close(load_fid_inception("")(images), feats)


def test_load_fid_inception_refuses_absent_and_foreign_files(inception_weights, tmp_path) -> None:
    with pytest.raises(ModelError, match="nope.pth' does not exist.*--inception-weights"):
        load_fid_inception(tmp_path / "nope.pth")
    state = torch.load(inception_weights, weights_only=True)
    state["Mixed_5b.extra.weight"] = torch.zeros(1)
    del state["fc.bias"]
    torch.save(state, tmp_path / "foreign.pth")
    with pytest.raises(ModelError, match="not the FID Inception state dict.*missing keys.*fc.bias.*Mixed_5b.extra"):
        load_fid_inception(tmp_path / "foreign.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read"):
        load_fid_inception(tmp_path / "garbage.pth")
    # start-up check: the metrics that need no weights load nothing; rfid fails before any work
    assert build_extractors(("psnr", "ssim")) == Extractors()
    with pytest.raises(ModelError, match="does not exist"):
        build_extractors(("psnr", "rfid"), inception_weights=str(tmp_path / "nope.pth"))
