"""The autoencoder objective's pieces: adversarial signs, the adaptive weight, LPIPS reaching the decoder."""

from __future__ import annotations

import pytest
import torch

from vae_train.config import Config, ConfigError, LossConfig, ModelConfig, config_from_dict
from vae_train.losses import (
    AutoencoderObjective,
    LastLayerTap,
    adaptive_weight,
    attach_output_logvar,
    discriminator_loss,
    generator_adv_loss,
)
from vae_train.model import ConvVAE, build_model
from vae_train.model.discriminator import PatchDiscriminator

TINY = ModelConfig(in_channels=3, image_size=16, base_channels=8, channel_mult=[1, 2], latent_channels=4,
                   norm_groups=4, likelihood="gaussian_fixed", reparam="reference")
# The objective reads the model only through its interface (x_params, last_decoder_layer): both architectures.
LDM_TINY = ModelConfig(arch="ldm", in_channels=3, image_size=16, block_out_channels=[8, 16], layers_per_block=1,
                       norm_num_groups=4, latent_channels=4, likelihood="gaussian_fixed", reparam="reference")
ARCHS = pytest.mark.parametrize("model_cfg", [TINY, LDM_TINY], ids=["convvae", "ldm"])


@pytest.mark.parametrize("kind", ["hinge", "vanilla"])
def test_adversarial_signs(kind: str) -> None:
    confident_real, confident_fake = torch.full((4,), 3.0), torch.full((4,), -3.0)
    # the discriminator's loss is low when it is right and high when it is wrong
    assert discriminator_loss(confident_real, confident_fake, kind) < discriminator_loss(confident_fake, confident_real, kind)
    # the decoder's loss falls as the discriminator believes its output more
    assert generator_adv_loss(confident_real, kind) < generator_adv_loss(confident_fake, kind)
    logits = torch.zeros(4, requires_grad=True)
    generator_adv_loss(logits, kind).backward()
    assert (logits.grad < 0).all()  # descending it raises D(x')
    if kind == "hinge":  # margins: a real logit above 1 and a fake one below -1 cost nothing
        assert discriminator_loss(torch.full((4,), 1.5), torch.full((4,), -1.5), kind) == 0
    else:  # non-saturating: -log sigmoid(D), still a gradient when D is sure the image is fake
        assert generator_adv_loss(torch.full((1,), -3.0), kind) == pytest.approx(torch.nn.functional.softplus(torch.tensor(3.0)).item())


@ARCHS
def test_adaptive_weight_matches_autograd_in_float64(model_cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    model = build_model(model_cfg).double()
    disc = PatchDiscriminator(3, channels=8, layers=2).double()
    tap = LastLayerTap(model.last_decoder_layer())
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1
    out = model(x)
    nll = (out.x_params - x).abs().sum() / 2
    g_loss = generator_adv_loss(disc(out.x_params), "hinge")
    weight = model.last_decoder_layer().weight
    g_nll = torch.autograd.grad(nll, weight, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, weight, retain_graph=True)[0]
    torch.testing.assert_close(tap.weight_grad(nll).double(), g_nll, rtol=1e-5, atol=1e-7)
    expected = g_nll.norm() / (g_adv.norm() + 1e-4)
    got = adaptive_weight(nll, g_loss, tap, 1e4)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert adaptive_weight(nll, g_loss, tap, 0.5).item() == pytest.approx(min(0.5, expected.item()))
    assert not got.requires_grad


@ARCHS
def test_lpips_term_reaches_the_decoder(random_vgg16, model_cfg: ModelConfig) -> None:
    """The anchors' bug: LPIPS computed under no_grad trains nothing. Here it moves decoder gradients."""
    from vae_train.model.perceptual import build_lpips

    lpips = build_lpips(str(random_vgg16))
    torch.manual_seed(0)
    model = build_model(model_cfg)
    x = torch.rand(2, 3, 16, 16) * 2 - 1

    def decoder_grad(perceptual_weight: float) -> torch.Tensor:
        model.zero_grad()
        objective = AutoencoderObjective(LossConfig(pixel="l1", perceptual_weight=perceptual_weight), lpips)
        out = model(x, generator=torch.Generator().manual_seed(1))
        terms = objective.generator_terms(model, x, out.x_params, out.kl, 1e-6, None, None)
        terms.loss.backward()
        if perceptual_weight:
            assert terms.perceptual > 0
        return model.last_decoder_layer().weight.grad.clone()

    with_lpips, without = decoder_grad(1.0), decoder_grad(0.0)
    assert (with_lpips - without).abs().max() > 1e-4 * without.abs().max()
    assert all(p.grad is None for p in lpips.parameters())


def test_learned_logvar_is_the_gaussian_nll_scale() -> None:
    torch.manual_seed(0)
    model = ConvVAE(TINY)
    attach_output_logvar(model, init=0.5)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = model(x)
    terms = AutoencoderObjective(LossConfig(pixel="l2", learned_logvar=True), None).generator_terms(
        model, x, out.x_params, out.kl, 0.0, None, None)
    expected = (((out.x_params - x) ** 2) / torch.exp(torch.tensor(0.5)) + 0.5).flatten(1).sum(1).mean()
    assert terms.nll.item() == pytest.approx(expected.item(), rel=1e-5)
    terms.loss.backward()
    assert model.loss_logvar.value.grad is not None


def test_group_norm_discriminator_scores_each_image_alone() -> None:
    torch.manual_seed(0)
    disc = PatchDiscriminator(3, channels=16, layers=3)
    x = torch.randn(4, 3, 64, 64)
    torch.testing.assert_close(disc(x)[:2], disc(x[:2]))  # no batch statistics: any split, any rank count
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in disc.modules())


@pytest.mark.parametrize("overrides, message", [
    ({"loss": {"disc_start": -1}}, "disc_start"),
    ({"loss": {"disc_weight": 0.5}}, "loss.pixel=none"),
    ({"loss": {"perceptual_weight": 1.0}}, "loss.pixel=none"),
    ({"loss": {"pixel": "l1"}, "model": {"likelihood": "bernoulli"}}, "gaussian_fixed"),
    ({"loss": {"pixel": "l1", "disc_weight": 0.5, "disc_start": 50}, "model": {"likelihood": "gaussian_fixed"},
      "train": {"max_steps": 50}}, "never train"),
    ({"ema": {"decay": 1.0}}, "ema.decay"),
])
def test_bad_settings_are_clear_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(overrides)


def test_recipe_config_is_accepted() -> None:
    cfg = config_from_dict({"loss": {"pixel": "l1", "perceptual_weight": 1.0, "disc_weight": 0.5, "disc_start": 10},
                            "model": {"likelihood": "gaussian_fixed"}, "ema": {"decay": 0.999}})
    assert isinstance(cfg, Config) and cfg.loss.disc_loss == "hinge" and cfg.loss.adaptive_weight
