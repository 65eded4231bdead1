"""Non-square images, any divisible input size, tiled encode/decode, and the memory settings of ConvVAE."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from torch.nn import functional as F

from vae_train.config import ModelConfig
from vae_train.model import ArchitectureError, ConvVAE, InputShapeError, vae_loss
from vae_train.model.activation_checkpointing import (
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
    is_checkpointed,
)
from vae_train.model.blocks import ResBlock
from vae_train.model.tiling import tile_starts, tiled_apply

pytestmark = pytest.mark.timeout(400)  # the first test using trained_vae pays its ~20 s training (minutes under load)


def tiny(**overrides: object) -> ModelConfig:
    fields: dict[str, object] = dict(base_channels=8, channel_mult=[1, 2, 2], latent_channels=2, norm_groups=4,
                                     reparam="reference")
    fields.update(overrides)
    return ModelConfig(**fields)


@pytest.mark.parametrize(
    ("size", "mode", "latent", "output"),
    [
        ([24, 40], "error", (2, 6, 10), (24, 40)),
        ([26, 40], "pad", (2, 7, 10), (26, 40)),  # height padded to 28, width as is
        ([26, 42], "crop", (2, 6, 10), (24, 40)),
    ],
)
def test_non_square_image_size(size: list[int], mode: str, latent: tuple[int, int, int],
                               output: tuple[int, int]) -> None:
    model = ConvVAE(tiny(image_size=size, size_mode=mode))
    assert model.latent_shape == latent and model.output_hw == output
    assert model.num_dims == output[0] * output[1]
    x = (torch.rand(3, 1, *size, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    out = model(x)
    assert out.x_params.shape == (3, 1, *output) and out.z.shape == (3, *latent)
    assert model.reconstruct(x).shape == (3, 1, *output)
    assert model.sample(2).shape == (2, 1, *output)
    # the ELBO of the rectangle equals the sum of its terms over exactly the scored pixels
    target = model.target(x)
    torch.testing.assert_close(out.recon_nll, -model.likelihood.log_prob(target, out.x_params))


def test_odd_side_is_refused_in_error_mode() -> None:
    with pytest.raises(ArchitectureError, match=r"image_size=\[26, 40\] is not divisible by .* 4"):
        ConvVAE(tiny(image_size=[26, 40], size_mode="error"))


def test_any_divisible_size_is_taken_as_is() -> None:
    """Aspect buckets and larger images: the network is fully convolutional; other odd sizes are refused."""
    model = ConvVAE(tiny(image_size=28))
    for hw in [(16, 48), (48, 16), (60, 84)]:
        x = (torch.rand(2, 1, *hw) > 0.5).float()
        out = model(x)
        assert out.x_params.shape == (2, 1, *hw) and out.mu.shape == (2, 2, hw[0] // 4, hw[1] // 4)
        assert model.reconstruct(x).shape == (2, 1, *hw)
        assert torch.isfinite(vae_loss(out, beta=1.0, free_bits=0.0).loss)
    with pytest.raises(InputShapeError, match=r"30x32 .* divisible by its downsampling factor 4"):
        model(torch.zeros(2, 1, 30, 32))


def test_pad_mode_refuses_the_padded_size() -> None:
    """A 28x28 pad-mode model pads to 32x32; a 32x32 input's latent could not be told from a padded one's
    (decode(z) would crop it), so it is refused; other divisible sizes pass whole."""
    model = ConvVAE(tiny(image_size=28, channel_mult=[1, 2, 2, 2]))
    x = (torch.rand(2, 1, 40, 48) > 0.5).float()
    assert model(x).x_params.shape == (2, 1, 40, 48) and model.reconstruct(x).shape == (2, 1, 40, 48)
    assert model(x[:, :, :28, :28]).x_params.shape == (2, 1, 28, 28)
    with pytest.raises(InputShapeError, match="32x32, the size model.size_mode=pad pads"):
        model(x[:, :, :32, :32])


# -- tiling ------------------------------------------------------------------------------


def test_tile_layout() -> None:
    assert tile_starts(56, 28, 8) == [0, 20, 28]
    assert tile_starts(28, 28, 8) == [0] and tile_starts(20, 28, 8) == [0]
    assert tile_starts(100, 32, 0) == [0, 32, 64, 68]
    with pytest.raises(ValueError, match="overlap < tile"):
        tile_starts(64, 16, 16)


@pytest.mark.parametrize(("fn", "scale"), [
    (lambda t: F.avg_pool2d(t, 4), Fraction(1, 4)),  # a strictly local "encoder"
    (lambda t: F.interpolate(t, scale_factor=4.0, mode="nearest"), Fraction(4)),  # a strictly local "decoder"
])
def test_blending_is_a_normalized_average(fn, scale: Fraction) -> None:
    """For a map without context the tiles agree on their overlaps, so the blend must equal the untiled map."""
    x = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    tile, overlap = ((16, 24), (8, 8)) if scale < 1 else ((4, 6), (2, 2))
    torch.testing.assert_close(tiled_apply(x, fn, tile, overlap, scale), fn(x), rtol=1e-6, atol=1e-6)


def test_single_tile_is_exact() -> None:
    model = ConvVAE(tiny(image_size=28)).eval()
    x = (torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    plain_mu, plain_logvar = model.encode(x)
    plain = model.reconstruct(x)
    model.enable_tiling(tile=28, overlap=8)
    mu, logvar = model.encode(x)
    assert torch.equal(mu, plain_mu) and torch.equal(logvar, plain_logvar)
    assert torch.equal(model.reconstruct(x), plain)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / F.mse_loss(a, b)))


def test_tiled_matches_untiled_on_a_larger_image(trained_vae) -> None:
    """A 56x56 mosaic of four real test images through a model trained at 28x28, whole and in tiles of 28.

    GroupNorm sees other statistics in a tile than in the whole image, so tiles cannot be
    exact; what must hold: the tiled reconstruction is as faithful to the input as the
    whole one, and the blended overlap brings it closer to the whole-image result than
    butting tiles without overlap does (measured: 22.5 vs 20.6 dB; 10.29 vs 10.29 dB to
    the binary input, whose Bernoulli means are far from 0/1 in a briefly trained model).
    """
    model = trained_vae.model
    imgs = trained_vae.test_images[:16]
    mosaic = torch.cat([torch.cat([imgs[0::4], imgs[1::4]], 3), torch.cat([imgs[2::4], imgs[3::4]], 3)], 2)
    assert mosaic.shape == (4, 1, 56, 56)
    model.disable_tiling()
    whole = model.reconstruct(mosaic)
    mu_whole = model.encode(mosaic)[0]
    results = {}
    try:
        for overlap in (0, 8):
            model.enable_tiling(tile=28, overlap=overlap)
            results[overlap] = model.reconstruct(mosaic)
        mu_tiled = model.encode(mosaic)[0]
    finally:
        model.disable_tiling()
    tiled, butted = results[8], results[0]
    assert tiled.shape == whole.shape == mosaic.shape and mu_tiled.shape == mu_whole.shape == (4, 4, 14, 14)
    assert abs(_psnr(tiled, mosaic) - _psnr(whole, mosaic)) < 0.25
    assert _psnr(tiled, whole) > 20.0
    assert _psnr(tiled, whole) > _psnr(butted, whole) + 1.0


def test_tiling_settings_are_checked() -> None:
    model = ConvVAE(tiny(image_size=28))
    with pytest.raises(ArchitectureError, match="multiples of the downsampling factor 4"):
        model.enable_tiling(tile=30)
    with pytest.raises(ArchitectureError, match="overlap < tile"):
        model.enable_tiling(tile=16, overlap=16)
    model.enable_tiling()
    assert model.tiling is not None and model.tiling.tile == (28, 28) and model.tiling.overlap == (4, 4)


# -- memory settings ---------------------------------------------------------------------


def _grads(model: ConvVAE, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    torch.manual_seed(seed)
    loss = vae_loss(model(x), beta=1.0, free_bits=0.0).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("reparam", ["reference", "fused"])
def test_gradient_checkpointing_gives_the_same_gradients(reparam: str) -> None:
    """Same loss and gradients with and without checkpointing (dropout on: the recomputation must redraw
    the same mask; the reparameterization noise after the encoder must not shift)."""
    torch.manual_seed(0)
    plain = ConvVAE(tiny(image_size=[16, 24], dropout=0.2, reparam=reparam))
    torch.manual_seed(0)
    ckpt = ConvVAE(tiny(image_size=[16, 24], dropout=0.2, reparam=reparam, gradient_checkpointing=True))
    blocks = [m for m in ckpt.modules() if isinstance(m, ResBlock)]
    assert blocks and all(is_checkpointed(m) for m in blocks)
    assert list(plain.state_dict()) == list(ckpt.state_dict())  # parameter names unchanged
    x = (torch.rand(4, 1, 16, 24, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    loss_a, grads_a = _grads(plain, x, seed=5)
    loss_b, grads_b = _grads(ckpt, x, seed=5)
    assert torch.equal(loss_a, loss_b)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_checkpointing_is_idempotent_and_reversible() -> None:
    model = ConvVAE(tiny())
    n = sum(isinstance(m, ResBlock) for m in model.modules())
    assert enable_gradient_checkpointing(model, (ResBlock,)) == n
    assert enable_gradient_checkpointing(model, (ResBlock,)) == 0
    # convolutions inside a checkpointed block are covered by its recomputation: only the others are added
    inside = {id(c) for m in model.modules() if isinstance(m, ResBlock) for c in m.modules()}
    outside = sum(isinstance(m, torch.nn.Conv2d) and id(m) not in inside for m in model.modules())
    assert outside > 0 and enable_gradient_checkpointing(model, (ResBlock, torch.nn.Conv2d)) == outside
    assert disable_gradient_checkpointing(model) == n + outside
    assert not any(is_checkpointed(m) for m in model.modules())


def test_channels_last_computes_the_same_function() -> None:
    torch.manual_seed(0)
    plain = ConvVAE(tiny(image_size=[16, 24]))
    torch.manual_seed(0)
    nhwc = ConvVAE(tiny(image_size=[16, 24], channels_last=True))
    x = (torch.rand(4, 1, 16, 24, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    seen = []
    for layer in (nhwc.encoder.norm_out, nhwc.decoder.norm_out):  # the last multi-channel activations
        layer.register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(
            memory_format=torch.channels_last) and not o.is_contiguous()))
    nhwc(x)
    assert seen == [True, True]  # encoder and decoder ran channels-last to their ends (1-channel input/output)
    loss_a, grads_a = _grads(plain, x, seed=5)
    loss_b, grads_b = _grads(nhwc, x, seed=5)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-4)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_compile_is_in_place_and_keeps_the_names() -> None:
    """model.compile compiles encoder and decoder in place (nn.Module.compile): same state-dict names, so
    checkpoints and exports load either way. (Running it costs minutes of compilation on 2 CPU cores: the
    benchmark measures it, benchmarks/memory.py --compile; measured once here, loss equal and gradients within
    4e-5 of the eager model's.)"""
    plain = ConvVAE(tiny())
    compiled = ConvVAE(tiny(compile=True))
    assert list(plain.state_dict()) == list(compiled.state_dict())
    assert compiled.encoder._compiled_call_impl is not None and compiled.decoder._compiled_call_impl is not None
    assert plain.encoder._compiled_call_impl is None


@pytest.mark.parametrize(("value", "message"), [
    ("[1,2,3]", r"must be an int \(square\) or \[H, W\] of two ints, got \[1, 2, 3\]"),
    ("big", "must be an int"),
    ("[2,64]", r"sides must be in 4..4096, got \[2, 64\]"),
])
def test_image_size_config_errors(value: str, message: str) -> None:
    from vae_train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"model.image_size={value}"])
    assert load_config(None, ["model.image_size=[32,48]"]).model.hw == (32, 48)
    assert load_config(None, ["model.image_size=64"]).model.hw == (64, 64)
