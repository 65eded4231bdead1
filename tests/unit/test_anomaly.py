"""Anomaly scores (vae_train.anomaly) and the score command's summary, on real numbers."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from vae_train import anomaly
from vae_train.commands.score import anomaly_summary, gather_rows, resolve_score
from vae_train.config import ModelConfig
from vae_train.evaluate import EvalError
from vae_train.model import ConvVAE


def _png_bytes(array: np.ndarray) -> int:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=True)
    return len(buffer.getvalue())


def test_png_nats_is_the_png_size_of_the_scored_image() -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    flat = np.zeros((28, 28), np.uint8)
    images = torch.from_numpy(np.stack([noise, flat])[:, None].astype(np.float32) / 255)
    nats = anomaly.png_nats(images, (0.0, 1.0))
    assert nats.tolist() == pytest.approx([_png_bytes(noise) * 8 * math.log(2), _png_bytes(flat) * 8 * math.log(2)])
    assert nats[0] > 5 * nats[1]  # noise does not compress, a flat image does
    # a binarized image in [-1, 1] is compressed as the 0/255 image the model scores
    binary = (rng.random((1, 1, 28, 28)) < 0.3).astype(np.float32)
    assert anomaly.png_nats(torch.from_numpy(binary * 2 - 1), (-1.0, 1.0)).item() == pytest.approx(
        _png_bytes((binary[0, 0] * 255).astype(np.uint8)) * 8 * math.log(2))


def test_latent_gaussian_is_the_shrunk_mahalanobis_distance() -> None:
    rng = np.random.default_rng(1)
    mu = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6)) + 3.0
    t = torch.from_numpy(mu)
    gaussian = anomaly.LatentGaussian.from_sums(len(mu), t.sum(0), anomaly.latent_moments(t), shrinkage=0.2)
    cov = np.cov(mu.T, bias=True)
    cov = 0.8 * cov + 0.2 * np.trace(cov) / 6 * np.eye(6)
    queries = rng.normal(size=(7, 6))
    d = queries - mu.mean(0)
    expected = np.einsum("bi,ij,bj->b", d, np.linalg.inv(cov), d)
    assert gaussian.distance(torch.from_numpy(queries)).numpy() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(anomaly.ScoreError, match="at least 2 images"):
        anomaly.LatentGaussian.from_sums(1, t[0], anomaly.latent_moments(t[:1]))


def test_knn_distance_is_the_mean_distance_to_the_nearest_normal_images() -> None:
    rng = np.random.default_rng(4)
    bank, queries = rng.normal(size=(300, 5)), rng.normal(size=(9, 5))
    brute = np.sort(np.linalg.norm(queries[:, None] - bank[None], axis=2), axis=1)[:, : anomaly.KNN_K].mean(1)
    got = anomaly.knn_distance(torch.from_numpy(bank), torch.from_numpy(queries), chunk=4)
    assert got.numpy() == pytest.approx(brute, rel=1e-5)
    # leave-one-out on the bank's own rows: the zero distance to itself is not counted
    own = anomaly.knn_distance(torch.from_numpy(bank), torch.from_numpy(bank[:3]), exclude_self=True)
    expected = np.sort(np.linalg.norm(bank[:3, None] - bank[None], axis=2), axis=1)[:, 1 : anomaly.KNN_K + 1].mean(1)
    assert own.numpy() == pytest.approx(expected, rel=1e-5)


def test_large_latents_get_a_diagonal_gaussian(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(anomaly, "MAX_FULL_COVARIANCE_DIMS", 4)
    t = torch.from_numpy(np.random.default_rng(2).normal(size=(100, 6)) * [1, 2, 3, 4, 5, 6])
    gaussian = anomaly.LatentGaussian.from_sums(100, t.sum(0), anomaly.latent_moments(t), shrinkage=0.0)
    var = t.var(0, unbiased=False)
    q = torch.ones(1, 6, dtype=torch.float64)
    assert gaussian.distance(q).item() == pytest.approx(((q[0] - t.mean(0)).square() / var).sum().item(), rel=1e-6)


def test_scores_of_a_real_model_follow_their_definitions() -> None:
    torch.manual_seed(0)
    model = ConvVAE(ModelConfig(image_size=28, in_channels=1, base_channels=8, channel_mult=[1, 2],
                                latent_channels=2, norm_groups=4, likelihood="bernoulli")).eval()
    x = (torch.rand(6, 1, 28, 28) < 0.3).float()
    terms = anomaly.image_terms(model, x, iw_samples=4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mu, _ = model.encode(x)
        recon = -model.likelihood.log_prob(x, model.decode(mu)).double()
    assert terms["recon"].numpy() == pytest.approx(recon.numpy(), rel=1e-5)
    base = anomaly.base_scores(terms)
    assert torch.allclose(base["complexity"], terms["iw"] - terms["png"])
    fit_terms = anomaly.image_terms(model, (torch.rand(40, 1, 28, 28) < 0.3).float())
    gaussian = anomaly.LatentGaussian.from_sums(40, fit_terms["mu"].sum(0), anomaly.latent_moments(fit_terms["mu"]))
    bank = fit_terms["mu"].float()
    fit_scores = {**anomaly.base_scores(fit_terms), "latent": gaussian.distance(fit_terms["mu"]),
                  "knn": anomaly.knn_distance(bank, fit_terms["mu"], exclude_self=True)}
    fit = anomaly.NormalFit(gaussian, bank, anomaly.stats_from_moments(anomaly.score_moments(fit_scores)))
    # on the normal images themselves the z-normalised parts have mean 0 and std 1
    on_fit = fit.scores(fit_terms)
    z = (on_fit["recon_png"] - on_fit["recon_png"].mean()) / on_fit["recon_png"].std(unbiased=False)
    assert torch.allclose(fit.z(on_fit, "recon_png"), z)
    # knn is z-normalised by the leave-one-out distances of the normal images
    loo = anomaly.knn_distance(bank, fit_terms["mu"], exclude_self=True)
    assert fit.stats["knn"][0] == pytest.approx(loo.mean().item())
    scores = fit.scores(terms)
    assert set(anomaly.SCORES) <= set(scores)
    assert torch.allclose(scores["recon_png"], scores["recon"] - terms["png"])
    # combined: each part z-normalised by its own mean/std over the normal images (computed here by hand)
    by_hand = sum((scores[n] - fit_scores[n].mean()) / fit_scores[n].std(unbiased=False)
                  for n in ("latent", "knn", "recon_png"))
    assert torch.allclose(scores["combined"], by_hand)


def _labels_and_scores(seed: int = 3):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, 400)
    good = np.round(rng.normal((labels != 1) * 1.0, 1.0), 1)
    return labels.tolist(), {"combined": torch.from_numpy(good), "nelbo": torch.from_numpy(-good)}


def test_summary_matches_scikit_learn() -> None:
    labels, scores = _labels_and_scores()
    summary = anomaly_summary(scores, labels, {1}, "combined")
    y = [lab != 1 for lab in labels]
    assert summary["auroc"] == pytest.approx(roc_auc_score(y, scores["combined"].numpy()), abs=1e-12)
    assert summary["auprc"] == pytest.approx(average_precision_score(y, scores["combined"].numpy()), abs=1e-12)
    assert summary["auroc_by_score"]["nelbo"] == pytest.approx(1 - summary["auroc"], abs=1e-12)
    assert summary["anomalies"] == sum(y)


def test_summary_bad_input() -> None:
    labels, scores = _labels_and_scores()
    with pytest.raises(EvalError, match=r"class\(es\) \[7\] do not occur in the scored data"):
        anomaly_summary(scores, labels, {1, 7}, "combined")
    with pytest.raises(EvalError, match="every scored image belongs to --normal-classes"):
        anomaly_summary(scores, labels, {0, 1, 2, 3}, "combined")
    note = anomaly_summary(scores, [-1] * len(labels), {1}, "combined")
    assert "auroc" not in note and "has no labels" in note["note"]
    assert "not computed" in anomaly_summary(scores, labels, None, "combined")["note"]


def test_score_choice() -> None:
    assert resolve_score(None, "shards#train", None) == anomaly.DEFAULT_SCORE
    assert resolve_score(None, None, 10) == "iw" and resolve_score(None, None, None) == "nelbo"
    with pytest.raises(anomaly.ScoreError, match="--fit-data"):
        resolve_score("latent", None, None)
    with pytest.raises(anomaly.ScoreError, match="--iw-samples"):
        resolve_score("iw", "x", None)


def test_gather_rows_in_one_process_keeps_rows() -> None:
    keys = ["train_000001", "a/b_c", "é"]
    rows = gather_rows((keys, torch.tensor([3, -1, 0]), {"nelbo": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)}))
    assert rows[0] == keys and rows[1] == [3, -1, 0] and rows[2]["nelbo"].tolist() == [1.0, 2.0, 3.0]
