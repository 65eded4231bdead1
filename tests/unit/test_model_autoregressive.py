"""The compact architecture (global latent) and the local autoregressive decoder.

The autoregressive likelihood is checked as a distribution: its masks hide every
pixel from itself and from earlier pixels (autograd), it sums to one over all 2^16
binary 4x4 images, the windowed sampler draws exactly what full-image recomputation
draws, and the IWAE bound with the context computed once equals a direct float64
computation.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vae_train.config import ConfigError, ModelConfig, load_config
from vae_train.evaluate import auto_iw_batch_size, iw_nll
from vae_train.model import ConvVAE, ModelError, vae_loss
from vae_train.ops.reference import soft_clamp_logvar

pytestmark = pytest.mark.timeout(120)


def compact(**overrides: object) -> ModelConfig:
    fields: dict[str, object] = dict(arch="compact", base_channels=8, channel_mult=[1, 1, 2], latent_channels=4,
                                     autoregressive_channels=8, autoregressive_layers=2, reparam="reference")
    fields.update(overrides)
    return ModelConfig(**fields)


def randomize(model: ConvVAE, seed: int = 0) -> ConvVAE:
    """Non-zero weights everywhere (the autoregressive output layer starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def binary(n: int, size: int = 28, seed: int = 0, channels: int = 1) -> torch.Tensor:
    return (torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) > 0.5).float()


@pytest.mark.parametrize(("overrides", "latent_shape"), [
    (dict(), (4, 1, 1)),
    (dict(channel_mult=[1, 2, 2, 2]), (4, 1, 1)),  # 28 is padded to 32
    (dict(channel_mult=[2], image_size=8), (4, 1, 1)),  # one resolution, no up/downsampling
    (dict(in_channels=3, image_size=16, autoregressive_channels=0), (4, 1, 1)),
    (dict(in_channels=3, image_size=16, autoregressive_gates=3), (4, 1, 1)),  # 3 channels x 3 gates
])
def test_compact_shapes_and_loss(overrides: dict, latent_shape: tuple[int, int, int]) -> None:
    model = ConvVAE(compact(**overrides))
    cfg = model.config
    x = binary(3, cfg.image_size, channels=cfg.in_channels)
    out = model(x)
    assert model.latent_shape == latent_shape and out.z.shape == (3, *latent_shape)
    assert out.x_params.shape == x.shape and out.kl_per_channel.shape == (3, cfg.latent_channels)
    vae_loss(out, beta=1.0, free_bits=0.1).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.reconstruct(x).shape == x.shape
    samples = model.sample(2, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (2, cfg.in_channels, cfg.image_size, cfg.image_size)
    assert 0.0 <= float(samples.min()) and float(samples.max()) <= 1.0


GATES = pytest.mark.parametrize("gates", [0, 2], ids=["added", "gated"])


@GATES
def test_autoregressive_logits_see_only_earlier_pixels(gates: int) -> None:
    """d logit_i / d x_j = 0 for every j at or after i in raster order, and not all zero before it."""
    model = randomize(ConvVAE(compact(image_size=8, channel_mult=[1, 2], autoregressive_kernel=3,
                                      autoregressive_gates=gates)))
    x = binary(1, 8).requires_grad_(True)
    z = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(1))
    logits = model.decode(z, x)
    seen_before = 0
    for i in range(64):
        (grad,) = torch.autograd.grad(logits.flatten()[i], x, retain_graph=True)
        grad = grad.flatten()
        assert torch.all(grad[i:] == 0), f"pixel {i} depends on pixel {int(grad[i:].nonzero()[0]) + i}"
        seen_before += int(grad[:i].abs().sum() > 0)
    assert seen_before == 63  # every pixel but the first looks back


@GATES
def test_autoregressive_likelihood_sums_to_one_over_all_images(gates: int) -> None:
    """sum over all 2^16 binary 4x4 images of p(x|z) = 1 : a normalized distribution."""
    model = randomize(ConvVAE(compact(image_size=4, channel_mult=[1], autoregressive_kernel=3,
                                      autoregressive_gates=gates))).double()
    images = torch.tensor(list(itertools.product((0.0, 1.0), repeat=16)), dtype=torch.float64).view(-1, 1, 4, 4)
    for seed in (0, 1):
        z = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        with torch.no_grad():
            log_p = model.likelihood.log_prob(images, model.decode(z.expand(len(images), -1, -1, -1), images))
        assert math.isclose(float(torch.logsumexp(log_p.double(), 0)), 0.0, abs_tol=1e-5)  # float32 log_prob


@GATES
def test_windowed_sampling_matches_full_recomputation(gates: int) -> None:
    """generate() draws pixel by pixel on a small window; recomputing the whole image per pixel draws the same."""
    model = randomize(ConvVAE(compact(image_size=12, channel_mult=[1, 2], autoregressive_gates=gates)))
    z = torch.randn(3, *model.latent_shape, generator=torch.Generator().manual_seed(2))
    got = model.generate(z, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    canvas = torch.zeros(3, 1, 12, 12)
    expected = torch.zeros(3, 1, 12, 12)
    with torch.no_grad():
        for row, col in itertools.product(range(12), range(12)):
            p = torch.sigmoid(model.decode(z, canvas)[:, :, row, col])
            expected[:, :, row, col] = p
            canvas[:, :, row, col] = (torch.rand(p.shape, generator=g) < p).float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@GATES
def test_iw_nll_of_the_autoregressive_model_matches_a_float64_reference(gates: int) -> None:
    """The bound with the context computed once equals the definition, evaluated in float64 sample by sample."""
    model = randomize(ConvVAE(compact(autoregressive_gates=gates)))
    x = binary(2, seed=3)
    k = 20
    got = iw_nll(model, x, k, iw_batch_size=8, generator=torch.Generator().manual_seed(4))
    ref_model = ConvVAE(compact(autoregressive_gates=gates)).double().eval()
    ref_model.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        mu, logvar = ref_model.encode(x.double())
        lv = soft_clamp_logvar(logvar)
        chunk = max(1, 8 // 2)
        log_w = []
        for start in range(0, k, chunk):  # same noise stream as iw_nll: chunks of 4 samples for 2 images
            m = min(chunk, k - start)
            eps = torch.randn((m, *mu.shape), generator=g, dtype=torch.float32).double()
            for j in range(m):
                z = mu + torch.exp(0.5 * lv) * eps[j]
                log_q = (-0.5 * eps[j].square() - 0.5 * lv - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
                log_prior = (-0.5 * z.square() - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
                log_px = ref_model.likelihood.log_prob(x.double(), ref_model.decode(z, x.double())).double()
                log_w.append(log_px + log_prior - log_q)
        expected = -(torch.logsumexp(torch.stack(log_w), 0) - math.log(k))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)


def test_decode_without_the_image_is_a_clear_error() -> None:
    model = ConvVAE(compact())
    with pytest.raises(ModelError, match="needs the image x it scores"):
        model.decode(torch.zeros(1, *model.latent_shape))


def test_iw_chunk_follows_the_decoder_size() -> None:
    """A wider decoder gets a smaller chunk (its activations per latent are larger)."""
    small = auto_iw_batch_size(ConvVAE(compact(base_channels=8)))
    large = auto_iw_batch_size(ConvVAE(compact(base_channels=64)))
    resnet = auto_iw_batch_size(ConvVAE(ModelConfig(base_channels=16)))
    assert 16 <= resnet < large < small <= 4096


@pytest.mark.parametrize(("override", "pattern"), [
    ("model.autoregressive_channels=8 model.likelihood=logistic", "bernoulli likelihood only"),
    ("model.autoregressive_kernel=4", "must be odd"),
    ("model.arch=pixel", "arch"),
    ("model.arch=ldm model.autoregressive_channels=8", "not ldm"),
    ("model.autoregressive_gates=2", "autoregressive_channels > 0"),
])
def test_bad_autoregressive_settings_are_refused(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, override.split())


def test_old_model_configs_stay_valid() -> None:
    """A config without the new keys builds the ResNet VAE with a spatial latent, as before."""
    cfg = load_config(None, ["model.base_channels=8", "model.norm_groups=4"])
    model = ConvVAE(cfg.model)
    assert cfg.model.arch == "convvae" and not model.is_autoregressive
    assert model.latent_shape == (cfg.model.latent_channels, 7, 7)
