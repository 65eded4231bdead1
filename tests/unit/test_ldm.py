"""model.arch=ldm: the AutoencoderKL behind ConvVAE's interface, its config checks, and train.trainable."""

from __future__ import annotations

import pytest
import torch

from vae_train.config import ConfigError, ModelConfig, load_config
from vae_train.model import AutoencoderKL, ConvVAE, InputShapeError, build_model, freeze, vae_loss
from vae_train.model.likelihoods import likelihood_value_range


def tiny(**overrides: object) -> ModelConfig:
    fields = dict(arch="ldm", in_channels=3, image_size=16, block_out_channels=[8, 16, 16], layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, likelihood="gaussian_fixed", reparam="reference")
    fields.update(overrides)
    return ModelConfig(**fields)


def images(cfg: ModelConfig, n: int = 2, h: int | None = None, w: int | None = None, seed: int = 0) -> torch.Tensor:
    lo, hi = likelihood_value_range(cfg.likelihood)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, cfg.in_channels, h or cfg.image_size, w or cfg.image_size, generator=g)
    if cfg.likelihood == "bernoulli":
        x = (x > 0.5).float()
    elif cfg.likelihood == "logistic":
        x = torch.round(x * 255) / 127.5 - 1
    else:
        x = lo + (hi - lo) * x
    return x


def test_factory_builds_each_arch_and_refuses_a_mismatch():
    assert isinstance(build_model(tiny()), AutoencoderKL)
    assert isinstance(build_model(ModelConfig(base_channels=8, channel_mult=[1, 2], norm_groups=4)), ConvVAE)
    with pytest.raises(Exception, match="arch=ldm"):
        AutoencoderKL(ModelConfig())


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian_fixed", "gaussian_learned", "logistic"])
def test_every_likelihood_trains(likelihood):
    """The objective is the likelihood's ELBO for ldm too: finite terms, gradients on every parameter."""
    cfg = tiny(likelihood=likelihood)
    model = build_model(cfg)
    x = images(cfg)
    out = model(x)
    assert out.recon_nll.shape == (2,) and out.kl.shape == (2,) and out.kl_per_channel.shape == (2, 4)
    assert out.mu.shape == (2, *model.latent_shape) == (2, 4, 4, 4)
    assert out.x_params.shape == (2, model.likelihood.params_per_channel * 3, 16, 16)
    vae_loss(out, beta=1.0, free_bits=0.0).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_any_size_divisible_by_the_factor_is_encoded_and_decoded():
    cfg = tiny()
    model = build_model(cfg).eval()
    x = images(cfg, h=12, w=20)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (2, 4, 3, 5)
    assert model.decode(mu).shape == (2, 3, 12, 20)
    assert model(x).recon_nll.shape == (2,)
    assert model.sample(3).shape == (3, 3, 16, 16)
    with pytest.raises(InputShapeError, match="divisible by its downsampling factor 4"):
        model.encode(images(cfg, h=14, w=16))
    with pytest.raises(InputShapeError, match="channels"):
        model.encode(torch.zeros(1, 1, 16, 16))


def test_downsampling_pads_right_and_bottom_only():
    """LDM's asymmetric padding: the top-left output pixel sees no padding, so it ignores nothing of the input."""
    model = build_model(tiny())
    down = model.encoder.down_blocks[0].downsamplers[0]
    x = torch.randn(1, 8, 4, 4)
    manual = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias,
                                        stride=2)
    torch.testing.assert_close(down(x), manual, rtol=0, atol=0)


def test_attention_matches_float64_reference():
    """Single-head softmax attention with residual, against an independent float64 evaluation."""
    model = build_model(tiny())
    attn = model.encoder.mid_block.attentions[0].double()
    x = torch.randn(2, 16, 3, 5, dtype=torch.float64)
    h = torch.nn.functional.group_norm(x, 4, attn.group_norm.weight, attn.group_norm.bias, eps=1e-6)
    t = h.flatten(2).transpose(1, 2)
    q, k, v = (t @ m.weight.T + m.bias for m in (attn.to_q, attn.to_k, attn.to_v))
    w = torch.softmax(q @ k.transpose(1, 2) / 16**0.5, dim=-1)
    expected = x + ((w @ v) @ attn.to_out[0].weight.T + attn.to_out[0].bias).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(attn(x), expected)


@pytest.mark.parametrize("flags", [dict(use_quant_conv=False, use_post_quant_conv=False),
                                   dict(mid_block_add_attention=False)])
def test_optional_parts_are_absent_from_the_weights(flags):
    names = build_model(tiny(**flags)).state_dict()
    if "use_quant_conv" in flags:
        assert not any(k.startswith(("quant_conv", "post_quant_conv")) for k in names)
    else:
        assert not any("attentions" in k for k in names)


def test_config_refuses_bad_ldm_settings():
    with pytest.raises(ConfigError, match="norm_num_groups=32 does not divide block_out_channels \\[8\\]"):
        load_config(None, ["model.arch=ldm", "model.block_out_channels=[8,64]", "model.image_size=32"])
    with pytest.raises(ConfigError, match="divisible by its downsampling factor 8"):
        load_config(None, ["model.arch=ldm", "model.image_size=28"])  # default block_out_channels: 4 levels
    with pytest.raises(ConfigError, match="train.trainable"):
        load_config(None, ["train.trainable=middle"])
    cfg = load_config(None, ["model.arch=ldm", "model.image_size=32"])
    assert cfg.model.block_out_channels == [128, 256, 512, 512]  # diffusers/SD defaults


@pytest.mark.parametrize("arch", ["ldm", "convvae"])
@pytest.mark.parametrize("trainable", ["decoder", "encoder"])
def test_freeze_leaves_the_other_part_without_gradients(arch, trainable):
    cfg = tiny() if arch == "ldm" else ModelConfig(base_channels=8, channel_mult=[1, 2], norm_groups=4,
                                                   likelihood="gaussian_fixed", reparam="reference")
    model = build_model(cfg)
    frozen = freeze(model, trainable)
    other = "encoder" if trainable == "decoder" else "decoder"
    assert frozen and all(n.startswith((other, "quant_conv" if other == "encoder" else "post_quant_conv"))
                          for n in frozen)
    if arch == "ldm":
        assert ("quant_conv.weight" in frozen) == (trainable == "decoder")
        assert ("post_quant_conv.weight" in frozen) == (trainable == "encoder")
    vae_loss(model(images(cfg, h=cfg.image_size, w=cfg.image_size)), beta=1.0, free_bits=0.0).loss.backward()
    params = dict(model.named_parameters())
    assert all(params[n].grad is None for n in frozen)
    assert all(p.grad is not None for n, p in params.items() if n not in frozen)
    assert model.num_parameters() == sum(p.numel() for n, p in params.items() if n not in frozen)


def test_bf16_weights_take_fp32_batches_and_match_fp32_closely():
    """Under distributed.precision=bf16 DeepSpeed casts the weights; fp32 batches are cast to them."""
    cfg = tiny()
    model = build_model(cfg)
    x = images(cfg)
    with torch.no_grad():
        reference = model.encode(x)[0]
        low = model.to(torch.bfloat16).encode(x)[0]
    assert low.dtype == torch.bfloat16
    assert (low.float() - reference).abs().max() < 0.05 * reference.abs().max()
    out = model(x)
    vae_loss(out, beta=1.0, free_bits=0.0).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad.float()).all() for p in model.parameters())


def test_last_decoder_layer_produces_the_decoder_output():
    """The layer an adaptive GAN weight reads is the one whose output is the likelihood's parameters."""
    model = build_model(tiny()).eval()
    seen = {}
    model.last_decoder_layer().register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    z = torch.randn(1, *model.latent_shape)
    torch.testing.assert_close(model.decode(z), seen["out"], rtol=0, atol=0)


def test_the_autoregressive_decoder_interface_is_the_plain_decoder():
    """decode(z, x) / context / generate: the shared signature that autoregressive ConvVAE decoders use."""
    cfg = tiny()
    model = build_model(cfg).eval()
    x = images(cfg)
    z = torch.randn(2, *model.latent_shape)
    assert not model.is_autoregressive and model.context(x) is None
    torch.testing.assert_close(model.decode(z, x), model.decode(z), rtol=0, atol=0)
    torch.testing.assert_close(model.decode(z, context=None), model.decode(z), rtol=0, atol=0)
    torch.testing.assert_close(model.generate(z), model.decode(z).clamp(-1, 1), rtol=0, atol=0)
