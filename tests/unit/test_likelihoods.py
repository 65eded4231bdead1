"""Each likelihood's log-probability against a direct float64 (or higher-precision) computation."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

from vae_train.model import (
    Bernoulli,
    DataRangeError,
    DiscretizedLogistic,
    GaussianFixed,
    GaussianLearned,
    bits_per_dim,
    build_likelihood,
    likelihood_value_range,
)

pytestmark = pytest.mark.timeout(60)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_bernoulli_matches_float64_log_mass() -> None:
    g = _gen(1)
    x = (torch.rand(3, 2, 5, 5, generator=g) > 0.5).float()
    logits = torch.randn(3, 2, 5, 5, generator=g) * 4
    p = torch.sigmoid(logits.double())
    expected = (x.double() * torch.log(p) + (1 - x.double()) * torch.log1p(-p)).flatten(1).sum(1)
    got = Bernoulli().log_prob(x, logits)
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


def test_bernoulli_is_stable_for_extreme_logits() -> None:
    x = torch.tensor([[[[1.0, 0.0]]]])
    logits = torch.tensor([[[[-200.0, 200.0]]]])
    assert Bernoulli().log_prob(x, logits).item() == pytest.approx(-400.0)


def test_gaussian_fixed_matches_float64_density() -> None:
    g = _gen(2)
    x = torch.rand(4, 3, 6, 6, generator=g) * 2 - 1
    mean = torch.rand(4, 3, 6, 6, generator=g) * 2 - 1
    std = 0.1
    d = x.double() - mean.double()
    expected = (-0.5 * (d / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    torch.testing.assert_close(GaussianFixed(std).log_prob(x, mean).double(), expected, rtol=1e-5, atol=1e-3)


def test_gaussian_learned_matches_float64_density() -> None:
    g = _gen(3)
    x = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1
    loc = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1
    log_std = torch.rand(2, 3, 4, 4, generator=g) * 4 - 4
    std = log_std.double().exp()
    expected = (
        -0.5 * ((x.double() - loc.double()) / std) ** 2 - std.log() - 0.5 * math.log(2 * math.pi)
    ).flatten(1).sum(1)
    got = GaussianLearned().log_prob(x, torch.cat([loc, log_std], dim=1))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-3)


def _logistic_log_mass_reference(k: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(pixel = k) of the 8-bit discretized logistic from its CDF, in 50-digit arithmetic.

    mpmath (a torch dependency) evaluates the CDF difference directly, so far-tail
    masses that underflow even float64 are exact references too; returned as float64.
    """
    mpmath.mp.dps = 50
    out = []
    for ki, mi, si in zip(k.flatten().tolist(), loc.double().flatten().tolist(), log_scale.double().flatten().tolist()):
        x = mpmath.mpf(ki) / mpmath.mpf("127.5") - 1
        s = mpmath.exp(mpmath.mpf(si))

        def cdf(v: mpmath.mpf, sign: int = 1, loc: float = mi, scale: mpmath.mpf = s) -> mpmath.mpf:
            """The logistic CDF (sign=-1: the survival function)."""
            return 1 / (1 + mpmath.exp(-sign * (v - mpmath.mpf(loc)) / scale))

        upper, lower = x + mpmath.mpf(1) / 255, x - mpmath.mpf(1) / 255
        if x <= mi:  # CDF(upper) - CDF(lower), both small
            mass = (mpmath.mpf(1) if ki >= 255 else cdf(upper)) - (0 if ki <= 0 else cdf(lower))
        else:  # SF(lower) - SF(upper), both small: no cancellation near 1
            mass = (mpmath.mpf(1) if ki <= 0 else cdf(lower, -1)) - (0 if ki >= 255 else cdf(upper, -1))
        out.append(float(mpmath.log(mass)))
    return torch.tensor(out, dtype=torch.float64).view(k.shape)


def test_discretized_logistic_matches_float64_cdf_difference() -> None:
    g = _gen(4)
    k = torch.randint(0, 256, (3, 3, 8, 8), generator=g)
    k[0, 0, 0, :4] = torch.tensor([0, 255, 1, 254])  # both edge bins and their neighbours
    loc = torch.rand(3, 3, 8, 8, generator=g) * 2.4 - 1.2
    log_scale = torch.rand(3, 3, 8, 8, generator=g) * 6 - 6.5  # scales from 0.002 to 0.6
    x = k.float() / 127.5 - 1
    expected = _logistic_log_mass_reference(k, loc, log_scale).flatten(1).sum(1)
    got = DiscretizedLogistic().log_prob(x, torch.cat([loc, log_scale], dim=1))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=2e-3)


def test_discretized_logistic_tails_are_accurate() -> None:
    """Bins far from the mean (masses down to ~1e-30) keep their exact log-mass in float32."""
    k = torch.tensor([0, 3, 40, 128, 200, 252, 255]).view(1, 1, 1, 7)
    loc = torch.full((1, 1, 1, 7), 0.95)
    log_scale = torch.full((1, 1, 1, 7), -4.0)
    expected = _logistic_log_mass_reference(k, loc, log_scale)
    params = torch.cat([loc, log_scale], dim=1)
    per_pixel = [
        DiscretizedLogistic().log_prob(k[..., i : i + 1].float() / 127.5 - 1, params[..., i : i + 1]).item()
        for i in range(7)
    ]
    torch.testing.assert_close(torch.tensor(per_pixel, dtype=torch.float64), expected.flatten(), rtol=1e-5, atol=1e-3)
    assert all(math.isfinite(v) for v in per_pixel)


def test_discretized_logistic_masses_sum_to_one() -> None:
    k = torch.arange(256).view(1, 1, 1, 256)
    lik = DiscretizedLogistic()
    for loc, log_scale in [(0.0, -3.0), (-0.99, -5.0), (0.7, 0.5)]:
        params = torch.cat([torch.full((1, 1, 1, 256), loc), torch.full((1, 1, 1, 256), log_scale)], dim=1)
        masses = [
            lik.log_prob(k[..., i : i + 1].float() / 127.5 - 1, params[..., i : i + 1]).double().exp()
            for i in range(256)
        ]
        assert torch.cat(masses).sum().item() == pytest.approx(1.0, abs=1e-5)


def test_discretized_logistic_gradients_are_finite_at_extremes() -> None:
    x = torch.tensor([-1.0, 1.0, 0.0, -1.0, 1.0]).view(1, 1, 1, 5)
    loc = torch.tensor([50.0, -50.0, 0.0, -1.0, 1.0]).view(1, 1, 1, 5).requires_grad_()
    log_scale = torch.tensor([-10.0, -10.0, 10.0, -7.0, -7.0]).view(1, 1, 1, 5).requires_grad_()
    out = DiscretizedLogistic().log_prob(x, torch.cat([loc, log_scale], dim=1))
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(loc.grad).all() and torch.isfinite(log_scale.grad).all()


def test_logistic_snaps_off_grid_values_to_their_bin() -> None:
    lik = DiscretizedLogistic()
    params = torch.cat([torch.full((1, 1, 1, 1), 0.1), torch.full((1, 1, 1, 1), -3.0)], dim=1)
    centre = torch.full((1, 1, 1, 1), 140 / 127.5 - 1)
    torch.testing.assert_close(lik.log_prob(centre + 0.002, params), lik.log_prob(centre, params))


def test_means_lie_in_the_value_range() -> None:
    params2 = torch.randn(2, 2, 4, 4) * 10
    for lik, params in [
        (Bernoulli(), params2[:, :1]),
        (GaussianFixed(0.1), params2[:, :1]),
        (GaussianLearned(), params2),
        (DiscretizedLogistic(), params2),
    ]:
        lo, hi = lik.value_range
        mean = lik.mean(params)
        assert mean.shape == (2, 1, 4, 4)
        assert mean.min() >= lo and mean.max() <= hi


def test_value_ranges_and_builder() -> None:
    assert likelihood_value_range("bernoulli") == (0.0, 1.0)
    for name in ("gaussian_fixed", "gaussian_learned", "logistic"):
        assert likelihood_value_range(name) == (-1.0, 1.0)
        assert build_likelihood(name).value_range == (-1.0, 1.0)
    with pytest.raises(ValueError, match="choose one of"):
        likelihood_value_range("poisson")


def test_bits_per_dim_is_nats_over_d_ln2() -> None:
    assert bits_per_dim(784 * math.log(2), 784) == pytest.approx(1.0)
    nats = torch.tensor([100.0, 250.0], dtype=torch.float64)
    torch.testing.assert_close(bits_per_dim(nats, 3 * 32 * 32), nats / (3 * 32 * 32 * math.log(2)))


def test_range_check_names_cause_and_fix() -> None:
    with pytest.raises(DataRangeError, match=r"needs data in \[0, 1\].*bernoulli for binary"):
        Bernoulli().check_range(-1.0, 1.0)
    with pytest.raises(DataRangeError, match=r"\[-1, 1\]"):
        DiscretizedLogistic().check_range(0.0, 255.0)
    DiscretizedLogistic().check_range(-1.0, 1.0)
