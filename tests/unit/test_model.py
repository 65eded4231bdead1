"""ConvVAE: shapes, size modes, ELBO terms, free bits, bad input, and a short real training run."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from vae_train.config import ModelConfig
from vae_train.errors import VaeTrainError
from vae_train.model import (
    ArchitectureError,
    ConvVAE,
    DataRangeError,
    InputShapeError,
    VAEOutput,
    bits_per_dim,
    vae_loss,
)
from vae_train.ops.reference import soft_clamp_logvar

from tests.fixtures.trained_vae import binarize, read_fashion_mnist

pytestmark = pytest.mark.timeout(120)


def tiny(**overrides: object) -> ModelConfig:
    """A small model that runs in milliseconds on the CPU (reference reparam unless overridden)."""
    fields: dict[str, object] = dict(base_channels=8, channel_mult=[1, 2], latent_channels=2, norm_groups=4)
    fields.setdefault("reparam", "reference")
    fields.update(overrides)
    return ModelConfig(**fields)


def batch_for(model: ConvVAE, n: int = 3, seed: int = 0) -> torch.Tensor:
    """Random images in the model's data range (binary for Bernoulli, 8-bit grid for logistic)."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    if cfg.likelihood == "bernoulli":
        return (u > 0.5).float()
    return torch.round(u * 255) / 127.5 - 1


@pytest.mark.parametrize(
    ("overrides", "latent_shape", "output_size"),
    [
        (dict(image_size=28, in_channels=1, likelihood="bernoulli"), (2, 14, 14), 28),
        (dict(image_size=28, channel_mult=[1, 2, 2, 2], size_mode="pad"), (2, 4, 4), 28),
        (dict(image_size=28, channel_mult=[1, 2, 2, 2], size_mode="crop"), (2, 3, 3), 24),
        (
            dict(image_size=64, in_channels=3, channel_mult=[1, 2, 2, 4], likelihood="logistic", latent_channels=4),
            (4, 8, 8),
            64,
        ),
        (dict(image_size=32, in_channels=3, likelihood="gaussian_learned", num_res_blocks=2), (2, 16, 16), 32),
        (dict(image_size=16, likelihood="gaussian_fixed", gaussian_std=0.2), (2, 8, 8), 16),
    ],
)
def test_shapes(overrides: dict, latent_shape: tuple[int, int, int], output_size: int) -> None:
    model = ConvVAE(tiny(**overrides))
    cfg = model.config
    x = batch_for(model)
    out = model(x)
    assert model.latent_shape == latent_shape
    assert model.output_size == output_size
    assert model.num_dims == cfg.in_channels * output_size**2
    params_c = model.likelihood.params_per_channel * cfg.in_channels
    assert out.x_params.shape == (3, params_c, output_size, output_size)
    assert out.z.shape == out.mu.shape == out.logvar.shape == (3, *latent_shape)
    for name in ("recon_nll", "kl"):
        value = getattr(out, name)
        assert value.shape == (3,) and value.dtype == torch.float32 and torch.isfinite(value).all()
    assert out.kl_per_channel.shape == (3, latent_shape[0]) and out.kl_per_channel.dtype == torch.float32
    torch.testing.assert_close(out.kl_per_channel.sum(1), out.kl)
    assert model.sample(2).shape == (2, cfg.in_channels, output_size, output_size)
    assert model.reconstruct(x).shape == (3, cfg.in_channels, output_size, output_size)
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())


def test_default_config_uses_the_fused_op() -> None:
    """``reparam: fused`` (the default) runs through vae_train.ops and agrees with the reference."""
    fused = ConvVAE(tiny(reparam="fused"))
    reference = ConvVAE(tiny(reparam="reference"))
    reference.load_state_dict(fused.state_dict())
    x = batch_for(fused)
    a = fused(x, generator=torch.Generator().manual_seed(5))
    b = reference(x, generator=torch.Generator().manual_seed(5))
    # The KL is deterministic; the noise differs (Philox in the kernel vs torch.randn).
    torch.testing.assert_close(a.kl, b.kl, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(a.kl_per_channel, b.kl_per_channel, rtol=1e-5, atol=1e-4)
    again = fused(x, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a.z, again.z)


def test_elbo_terms_are_consistent() -> None:
    """recon_nll is -log p(x|z) of the returned z; kl is the analytic Gaussian KL of (mu, logvar)."""
    model = ConvVAE(tiny(image_size=28, channel_mult=[1, 2, 2, 2], size_mode="pad"))
    x = batch_for(model)
    out = model(x, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        nll = -model.likelihood.log_prob(model.target(x), model.decode(out.z))
    torch.testing.assert_close(out.recon_nll, nll, rtol=1e-5, atol=1e-3)
    mu, lv = out.mu.double(), soft_clamp_logvar(out.logvar.double())
    kl = (0.5 * (mu**2 + lv.exp() - 1 - lv)).flatten(1).sum(1)
    torch.testing.assert_close(out.kl.double(), kl, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.nelbo, out.recon_nll + out.kl)
    assert bits_per_dim(out.nelbo, model.num_dims).shape == (3,)


def test_pad_mode_scores_only_the_real_pixels() -> None:
    """Changing pixels of the padding cannot happen; changing a real pixel changes the score."""
    model = ConvVAE(tiny(image_size=28, channel_mult=[1, 2, 2, 2], size_mode="pad")).eval()
    x = batch_for(model, n=1)
    params = model.decode(model.encode(x)[0])
    assert params.shape[-2:] == (28, 28)
    flipped = x.clone()
    flipped[0, 0, 27, 27] = 1 - flipped[0, 0, 27, 27]  # the bottom-right real pixel
    assert model.likelihood.log_prob(flipped, params) != model.likelihood.log_prob(x, params)


def test_crop_mode_describes_the_centre_crop() -> None:
    model = ConvVAE(tiny(image_size=28, channel_mult=[1, 2, 2, 2], size_mode="crop"))
    x = batch_for(model, n=2)
    torch.testing.assert_close(model.target(x), x[:, :, 2:26, 2:26])
    assert model.reconstruct(x).shape == (2, 1, 24, 24)


def test_size_mode_error_refuses_odd_sizes() -> None:
    with pytest.raises(ArchitectureError, match=r"image_size=28 is not divisible by .* 8.*size_mode=pad"):
        ConvVAE(tiny(image_size=28, channel_mult=[1, 2, 2, 2], size_mode="error"))
    ConvVAE(tiny(image_size=32, channel_mult=[1, 2, 2, 2], size_mode="error"))  # divisible: fine


def test_crop_to_nothing_is_refused() -> None:
    with pytest.raises(ArchitectureError, match="crop"):
        ConvVAE(tiny(image_size=6, channel_mult=[1, 1, 1, 1], size_mode="crop"))


def test_generator_makes_forward_and_sample_reproducible() -> None:
    model = ConvVAE(tiny())
    x = batch_for(model)
    a = model(x, generator=torch.Generator().manual_seed(3))
    b = model(x, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.z, b.z)
    s1 = model.sample(4, temperature=0.7, generator=torch.Generator().manual_seed(9))
    s2 = model.sample(4, temperature=0.7, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(s1, s2)
    assert s1.min() >= 0 and s1.max() <= 1


@pytest.mark.parametrize(
    ("make_input", "error", "pattern"),
    [
        (lambda: torch.zeros(2, 3, 28, 28), InputShapeError, r"3 channels .* model.in_channels=1"),
        (lambda: torch.zeros(2, 1, 29, 30), InputShapeError, r"29x30 .* model.image_size=28x28 .* divisible by .* 2"),
        (lambda: torch.zeros(1, 28, 28), InputShapeError, r"shape \[B, 1, 28, 28\]"),
        (lambda: torch.zeros(2, 1, 28, 28, dtype=torch.uint8), InputShapeError, "dtype torch.uint8"),
        (lambda: torch.full((2, 1, 28, 28), float("nan")), InputShapeError, "NaN"),
        (lambda: torch.zeros(0, 1, 28, 28), InputShapeError, "empty"),
        (lambda: torch.rand(2, 1, 28, 28) * 2 - 1, DataRangeError, r"'bernoulli' likelihood needs data in \[0, 1\]"),
        (lambda: torch.rand(2, 1, 28, 28) * 255, DataRangeError, "scale the images"),
    ],
)
def test_bad_input_gets_a_clear_error(make_input, error: type[Exception], pattern: str) -> None:
    model = ConvVAE(tiny())
    with pytest.raises(error, match=pattern) as info:
        model(make_input())
    assert isinstance(info.value, VaeTrainError)


def test_range_check_can_be_skipped_but_shape_checks_cannot() -> None:
    """check_range=False (the trainer after its first batch) drops only the host-syncing value check."""
    model = ConvVAE(tiny())
    out = model(torch.rand(2, 1, 28, 28) * 2 - 1, check_range=False)  # out of range, not checked
    assert out.recon_nll.shape == (2,)
    with pytest.raises(InputShapeError, match="29x29"):
        model(torch.zeros(2, 1, 29, 29), check_range=False)


def test_logistic_model_rejects_unit_range_overflow() -> None:
    model = ConvVAE(tiny(likelihood="logistic"))
    with pytest.raises(DataRangeError, match=r"\[-1, 1\]"):
        model(torch.rand(2, 1, 28, 28) * 255)


def _output(kl_per_channel: torch.Tensor) -> VAEOutput:
    b = kl_per_channel.shape[0]
    zeros = torch.zeros(b, 1)
    return VAEOutput(
        recon_nll=torch.full((b,), 10.0),
        kl=kl_per_channel.sum(1),
        kl_per_channel=kl_per_channel,
        z=zeros,
        mu=zeros,
        logvar=zeros,
        x_params=zeros,
    )


def test_vae_loss_without_free_bits() -> None:
    kl_c = torch.tensor([[0.1, 2.0], [0.3, 4.0]])
    terms = vae_loss(_output(kl_c), beta=0.5, free_bits=0.0)
    assert terms.recon.item() == pytest.approx(10.0)
    assert terms.kl.item() == pytest.approx(3.2)
    assert terms.kl_penalty.item() == pytest.approx(3.2)
    assert terms.loss.item() == pytest.approx(10.0 + 0.5 * 3.2)


def test_free_bits_clamp_and_gradient_mask() -> None:
    """Channels whose batch-mean KL is under the floor count as the floor and get no gradient."""
    kl_c = torch.tensor([[0.1, 2.0], [0.3, 4.0]], requires_grad=True)
    terms = vae_loss(_output(kl_c), beta=2.0, free_bits=1.0)
    assert terms.kl_penalty.item() == pytest.approx(1.0 + 3.0)  # max(1, 0.2) + max(1, 3)
    assert terms.kl.item() == pytest.approx(3.2)  # the reported KL is the true one
    assert terms.loss.item() == pytest.approx(10.0 + 2.0 * 4.0)
    terms.loss.backward()
    torch.testing.assert_close(kl_c.grad, torch.tensor([[0.0, 1.0], [0.0, 1.0]]))


def test_model_library_imports_no_training_machinery() -> None:
    code = (
        "import sys, vae_train.model, vae_train.schedules\n"
        "heavy = [m for m in ('deepspeed', 'webdataset', 'boto3', 'accelerate') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.timeout(300)
def test_short_training_on_fashion_mnist_lowers_the_loss() -> None:
    images, _ = read_fashion_mnist("train", 512)
    x_all = binarize(images, seed=0)
    torch.manual_seed(0)
    model = ConvVAE(ModelConfig(base_channels=16, channel_mult=[1, 2, 2], latent_channels=4, norm_groups=8, reparam="reference"))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    held_out = x_all[:64]

    def held_out_nelbo() -> float:
        with torch.no_grad():
            out = model(held_out, generator=torch.Generator().manual_seed(1))
        return out.nelbo.mean().item()

    before = held_out_nelbo()
    g = torch.Generator().manual_seed(2)
    for step in range(60):
        idx = torch.randint(64, len(x_all), (32,), generator=g)
        terms = vae_loss(model(x_all[idx], generator=g), beta=min(1.0, step / 20), free_bits=0.05)
        opt.zero_grad()
        terms.loss.backward()
        opt.step()
    after = held_out_nelbo()
    assert math.isfinite(after)
    # 784 binary pixels start at ~550 nats (log 2 each); 60 steps reach well under 350.
    assert after < 0.65 * before, (before, after)


def test_bf16_model_takes_fp32_batches_and_reports_fp32_terms() -> None:
    model = ConvVAE(tiny(likelihood="logistic")).to(torch.bfloat16)
    x = batch_for(model)
    out = model(x)
    assert out.recon_nll.dtype == torch.float32 and out.kl.dtype == torch.float32
    assert torch.isfinite(out.nelbo).all()
