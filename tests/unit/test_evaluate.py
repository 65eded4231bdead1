"""Evaluation metrics: the IWAE bound, active units, PSNR/SSIM, AUROC/AUPRC."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity
from sklearn.metrics import average_precision_score, roc_auc_score

from vae_train.config import ModelConfig
from vae_train.evaluate import (
    EvalError,
    auprc,
    auroc,
    evaluate_stream,
    iw_nll,
    psnr,
    ssim,
)
from vae_train.model import ConvVAE

pytestmark = pytest.mark.timeout(180)


def test_iw_nll_needs_at_least_one_sample(trained_vae) -> None:
    with pytest.raises(EvalError, match=">= 1"):
        iw_nll(trained_vae.model, trained_vae.test_images[:4], 0)


def test_iw_bound_is_below_the_elbo_and_tightens_with_k(trained_vae) -> None:
    model, x = trained_vae.model, trained_vae.test_images[:16]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        nelbo = torch.stack([model(x, generator=g).nelbo for _ in range(20)]).mean().item()
    nll = {k: iw_nll(model, x, k, iw_batch_size=512, generator=g).mean().item() for k in (1, 10, 100)}
    # Measured gaps on this model: ~10 nats from the ELBO to K=10, ~3 from K=10 to K=100.
    assert nll[100] < nll[10] - 0.5 < nelbo - 3.0
    assert abs(nll[1] - nelbo) < 4.0  # K=1 is the one-sample ELBO (next test: exactly, in expectation)


def test_iw_k1_equals_the_elbo_in_expectation(trained_vae) -> None:
    """Averaged over many draws, the K=1 estimate matches the analytic-KL negative ELBO."""
    model, x = trained_vae.model, trained_vae.test_images[:8]
    g = torch.Generator().manual_seed(2)
    draws = 100
    k1 = torch.stack([iw_nll(model, x, 1, generator=g) for _ in range(draws)])
    with torch.no_grad():
        elbo = torch.stack([model(x, generator=g).nelbo.double() for _ in range(draws)])
    diff = k1.mean(0) - elbo.mean(0)
    stderr = ((k1.var(0) + elbo.var(0)) / draws).sqrt()
    assert (diff.abs() < 5 * stderr + 1e-3).all(), (diff, stderr)


def test_iw_is_exact_when_the_posterior_is_the_prior_and_the_decoder_ignores_z() -> None:
    """Then every importance weight equals p(x), so any K and any chunking give -log p(x) exactly."""
    model = ConvVAE(ModelConfig(base_channels=8, channel_mult=[1, 2], latent_channels=2, norm_groups=4, reparam="reference"))
    with torch.no_grad():
        for conv in (model.encoder.conv_out, model.decoder.conv_in):
            conv.weight.zero_()
            conv.bias.zero_()
    x = (torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    exact = -model.likelihood.log_prob(x, model.decode(torch.zeros(3, *model.latent_shape))).double()
    for k, chunk in [(1, 1024), (7, 3), (50, 1024), (50, 10)]:
        torch.testing.assert_close(iw_nll(model, x, k, iw_batch_size=chunk), exact, rtol=1e-6, atol=1e-3)


def test_iw_k1000_decodes_in_bounded_chunks(trained_vae, monkeypatch: pytest.MonkeyPatch) -> None:
    """K=1000 never decodes more than iw_batch_size latents at once (so it fits memory)."""
    model, x = trained_vae.model, trained_vae.test_images[:2]
    sizes: list[int] = []
    decode = model.decode

    def counting_decode(z: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        sizes.append(z.shape[0])
        return decode(z, *args, **kwargs)

    monkeypatch.setattr(model, "decode", counting_decode)
    nll = iw_nll(model, x, 1000, iw_batch_size=300, generator=torch.Generator().manual_seed(3))
    assert sum(sizes) == 2000 and max(sizes) <= 300
    assert nll.dtype == torch.float64 and nll.shape == (2,) and torch.isfinite(nll).all()


def test_psnr_hand_checked() -> None:
    a = torch.zeros(2, 1, 4, 4)
    b = torch.full((2, 1, 4, 4), 0.1)
    torch.testing.assert_close(psnr(a, b), torch.full((2,), 20.0, dtype=torch.float64))
    assert psnr(a, a)[0].item() == pytest.approx(100.0)  # capped, not infinite


def test_ssim_matches_scikit_image() -> None:
    g = torch.Generator().manual_seed(5)
    a = torch.rand(3, 3, 28, 28, generator=g)
    b = (a + 0.2 * torch.randn(3, 3, 28, 28, generator=g)).clamp(0, 1)
    got = ssim(a, b)
    for i in range(3):
        ref = structural_similarity(
            a[i].double().numpy(),
            b[i].double().numpy(),
            data_range=1.0,
            channel_axis=0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        assert got[i].item() == pytest.approx(ref, abs=1e-9)
    torch.testing.assert_close(ssim(a, a), torch.ones(3, dtype=torch.float64))


def test_ssim_of_constant_images_is_the_luminance_term() -> None:
    a = torch.full((1, 1, 16, 16), 0.2, dtype=torch.float64)
    b = torch.full((1, 1, 16, 16), 0.6, dtype=torch.float64)
    c1 = 0.01**2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)
    assert ssim(a, b).item() == pytest.approx(expected, rel=1e-9)


def test_auroc_and_auprc_match_scikit_learn() -> None:
    rng = np.random.default_rng(6)
    for trial in range(5):
        labels = rng.random(300) < 0.3
        scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounding makes many ties
        finite = scores.copy()
        if trial == 4:  # +inf (a diverged score) ranks as most anomalous; sklearn refuses inf
            scores[:10], finite[:10] = np.inf, 1e300
        assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, finite), abs=1e-12)
        assert auprc(scores, labels) == pytest.approx(average_precision_score(labels, finite), abs=1e-12)


def test_auroc_hand_checked_and_bad_input() -> None:
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([1, 1, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="both normal and anomalous"):
        auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="NaN"):
        auprc([0.1, float("nan")], [0, 1])


def _batches(x: torch.Tensor, size: int, pad_to: int | None = None):
    """Dict batches as the data pipeline yields them; the last one padded with masked samples."""
    for start in range(0, len(x), size):
        image = x[start : start + size]
        mask = torch.ones(len(image), dtype=torch.bool)
        if pad_to and len(image) < pad_to:
            fill = pad_to - len(image)
            image = torch.cat([image, torch.ones(fill, *image.shape[1:])])
            mask = torch.cat([mask, torch.zeros(fill, dtype=torch.bool)])
        yield {"image": image, "mask": mask, "key": [f"{start + i}" for i in range(len(image))]}


def test_evaluate_stream_metrics(trained_vae) -> None:
    model, x = trained_vae.model, trained_vae.test_images[:100]
    metrics = evaluate_stream(model, _batches(x, 32, pad_to=32), iw_samples=20, seed=7)
    assert metrics["images"] == 100 and metrics["nonfinite_images"] == 0
    d = model.num_dims
    for key in ("nelbo", "recon", "kl", "iw_nll"):
        assert metrics[f"{key}_bpd"] == pytest.approx(metrics[f"{key}_nats"] / (d * math.log(2)))
    assert metrics["nelbo_nats"] == pytest.approx(metrics["recon_nats"] + metrics["kl_nats"])
    assert metrics["iw_nll_nats"] < metrics["nelbo_nats"]
    assert 0 < metrics["psnr_db"] < 100 and 0 < metrics["ssim"] < 1
    assert model.training is False
    # Active units against a direct float64 computation of Var_x(mu) > 0.01.
    with torch.no_grad():
        mu = model.encode(x)[0].double().flatten(1)
    var = mu.var(0, unbiased=False)
    assert metrics["active_units"] == int((var > 0.01).sum())
    assert metrics["latent_units"] == mu.shape[1]
    per_channel = var.view(model.latent_shape[0], -1).mean(1)
    assert metrics["active_channels"] == int((per_channel > 0.01).sum())
    # Padding samples are ignored: the same images unpadded, in other batch sizes, agree.
    again = evaluate_stream(model, _batches(x, 50), iw_samples=0, seed=7)
    assert again["images"] == 100
    assert again["active_units"] == metrics["active_units"]
    assert again["nelbo_nats"] == pytest.approx(metrics["nelbo_nats"], abs=1.0)  # one-sample noise


def test_evaluate_stream_max_batches_and_bad_input(trained_vae) -> None:
    model, x = trained_vae.model, trained_vae.test_images[:64]
    assert evaluate_stream(model, _batches(x, 16), max_batches=2)["images"] == 32
    with pytest.raises(EvalError, match="no images"):
        evaluate_stream(model, iter([]))
    with pytest.raises(EvalError, match="iw_samples must be >= 0"):
        evaluate_stream(model, _batches(x, 16), iw_samples=-1)
    with pytest.raises(EvalError, match="ConvVAE"):
        evaluate_stream(torch.nn.Linear(2, 2), _batches(x, 16))


def test_diverged_model_is_reported() -> None:
    model = ConvVAE(ModelConfig(base_channels=8, channel_mult=[1, 2], latent_channels=2, norm_groups=4, reparam="reference"))
    with torch.no_grad():
        model.decoder.conv_out.bias.fill_(float("nan"))
    x = torch.zeros(4, 1, 28, 28)
    with pytest.raises(EvalError, match="non-finite"):
        evaluate_stream(model, _batches(x, 4))
