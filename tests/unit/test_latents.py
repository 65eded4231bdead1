"""Latent statistics (float64 against numpy), keyed posterior noise, the latents sample kind, the
validation hook, and clear errors of ``latent-stats``/``encode`` on bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save

from tests.launching import free_port
from vae_train.cli import main
from vae_train.config import ModelConfig
from vae_train.data.decode import DecodeSpec, SampleRejected, decode_sample
from vae_train.encode import safetensors_members
from vae_train.evaluate import evaluate_stream
from vae_train.latents import LatentError, LatentMoments, draw, keyed_noise, latent_statistics_pass, posterior
from vae_train.model import ConvVAE
from vae_train.ops.reference import soft_clamp_logvar


def _latents(seed: int = 0) -> list[torch.Tensor]:
    """Batches of unequal size whose channels have clearly different means and spreads."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([3.0, -1.0, 0.0]).view(1, 3, 1, 1)
    scales = torch.tensor([0.5, 2.0, 10.0]).view(1, 3, 1, 1)
    return [torch.randn((n, 3, 5, 5), generator=g) * scales + offsets for n in (7, 1, 12)]


def test_statistics_match_numpy_float64() -> None:
    batches = _latents()
    moments = LatentMoments(3)
    for z in batches:
        moments.add(z)
    stats = moments.summary()
    every = np.concatenate([z.numpy().astype(np.float64) for z in batches])  # [N, C, h, w]
    per_channel = every.transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(stats["latents_mean"], per_channel.mean(1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats["latents_std"], per_channel.std(1), rtol=1e-12)
    assert stats["shift_factor"] == pytest.approx(every.mean(), rel=1e-12, abs=1e-12)
    assert stats["scaling_factor"] == pytest.approx(1 / every.std(), rel=1e-12)
    normalized = (every - stats["shift_factor"]) * stats["scaling_factor"]
    assert normalized.mean() == pytest.approx(0.0, abs=1e-12) and normalized.std() == pytest.approx(1.0, rel=1e-12)
    assert stats["elements"] == every.size


def test_statistics_refuse_empty_and_constant_latents() -> None:
    with pytest.raises(LatentError, match="no latents"):
        LatentMoments(2).summary()
    constant = LatentMoments(2)
    constant.add(torch.ones(4, 2, 3, 3))
    with pytest.raises(LatentError, match="std 0"):
        constant.summary()


def test_keyed_noise_depends_on_seed_and_key_only() -> None:
    both = keyed_noise(["a", "b"], (2, 3, 3), seed=5)
    assert torch.equal(keyed_noise(["b", "a"], (2, 3, 3), seed=5), both.flip(0))
    assert torch.equal(keyed_noise(["b"], (2, 3, 3), seed=5)[0], both[1])
    assert not torch.equal(keyed_noise(["a"], (2, 3, 3), seed=6)[0], both[0])
    big = keyed_noise([f"k{i}" for i in range(200)], (4, 8, 8), seed=0).double()
    assert abs(big.mean().item()) < 0.02 and big.std().item() == pytest.approx(1.0, abs=0.02)


@pytest.fixture(scope="module")
def model() -> ConvVAE:
    torch.manual_seed(0)
    return ConvVAE(ModelConfig(base_channels=8, channel_mult=[1, 2], latent_channels=4, norm_groups=4)).eval()


def _image_batches(n_batches: int = 3, size: int = 6) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    batches = []
    for b in range(n_batches):
        mask = torch.ones(size, dtype=torch.bool)
        mask[-2:] = b == 0  # padding slots in the later batches
        batches.append({"image": torch.rand((size, 1, 28, 28), generator=g), "key": [f"{b}-{i}" for i in range(size)],
                        "mask": mask})
    return batches


def test_statistics_pass_counts_real_images_and_matches_a_direct_encode(model: ConvVAE) -> None:
    batches = _image_batches()
    kept = [(b["image"][b["mask"]], [k for k, m in zip(b["key"], b["mask"].tolist()) if m]) for b in batches]
    with torch.no_grad():
        mus, lvs = zip(*(model.encode(x) for x, _ in kept))
    mu = torch.cat(mus).double()
    stats = latent_statistics_pass(model, batches, latents="mean")
    assert stats["images"] == sum(len(k) for _, k in kept) == 14 and stats["latents"] == "mean"
    assert stats["scaling_factor"] == pytest.approx(1 / mu.std(unbiased=False).item(), rel=1e-9)
    np.testing.assert_allclose(stats["latents_mean"], mu.mean((0, 2, 3)).numpy(), rtol=1e-9, atol=1e-12)

    # samples: mu + exp(soft_clamp(logvar)/2) * noise seeded by each key
    keys = [k for _, ks in kept for k in ks]
    lv = soft_clamp_logvar(torch.cat(lvs)).double()
    z = mu + torch.exp(0.5 * lv) * keyed_noise(keys, model.latent_shape, seed=3).double()
    sampled = latent_statistics_pass(model, batches, latents="sample", seed=3)
    assert sampled["scaling_factor"] == pytest.approx(1 / z.std(unbiased=False).item(), rel=1e-6)

    capped = latent_statistics_pass(model, batches, latents="mean", max_images=5)
    first5 = mu[:5]
    assert capped["images"] == 5
    assert capped["shift_factor"] == pytest.approx(first5.mean().item(), rel=1e-9)


def test_posterior_draw_is_the_reparameterization(model: ConvVAE) -> None:
    x = torch.rand(3, 1, 28, 28)
    mean, logvar = posterior(model, x)
    with torch.no_grad():
        mu, raw = model.encode(x)
    assert torch.equal(mean, mu) and torch.equal(logvar, soft_clamp_logvar(raw))
    keys = ["x", "y", "z"]
    expected = mu + torch.exp(0.5 * soft_clamp_logvar(raw)) * keyed_noise(keys, model.latent_shape, 0)
    torch.testing.assert_close(draw(mean, logvar, keys, 0), expected)


def test_validation_reports_the_latent_statistics(model: ConvVAE) -> None:
    batches = _image_batches()
    metrics = evaluate_stream(model, batches)
    direct = latent_statistics_pass(model, batches, latents="mean")
    assert metrics["latent_scaling_factor"] == pytest.approx(direct["scaling_factor"], rel=1e-9)
    assert metrics["latent_shift_factor"] == pytest.approx(direct["shift_factor"], rel=1e-9)
    for c in range(4):
        assert metrics[f"latent_std_c{c}"] == pytest.approx(direct["latents_std"][c], rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_latent_samples_decode_to_float32_and_bad_ones_are_rejected(dtype: torch.dtype) -> None:
    spec = DecodeSpec(image_size=3, channels=8, value_range=(0.0, 0.0), kind="latents")
    latent = torch.randn(8, 3, 3).to(dtype)
    array, label = decode_sample("k", {"safetensors": save({"latents": latent}), "cls": b"7"}, spec, None)
    assert array.dtype == np.float32 and label == 7
    np.testing.assert_array_equal(array, latent.float().numpy())
    bad = {
        "size": {"safetensors": save({"latents": torch.zeros(4, 3, 3)})},
        "no_latents": {"png": b"..."},
        "undecodable": {"safetensors": b"not a safetensors file"},
    }
    for reason, members in bad.items():
        with pytest.raises(SampleRejected) as info:
            decode_sample("k", members, spec, None)
        assert info.value.reason == reason


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_encode_writes_what_safetensors_writes(dtype: torch.dtype) -> None:
    batch = torch.randn(3, 8, 5, 5).to(dtype)
    assert safetensors_members(batch) == [save({"latents": row.clone()}) for row in batch]


def test_commands_give_clear_errors_on_bad_input(exported_vae: Path, fashion_shards: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "no-such-checkpoint")
    for command in (["latent-stats"], ["encode", "--out", str(tmp_path / "out")]):
        assert main([*command, "--checkpoint", missing, "--data", str(fashion_shards)]) == 2
        assert "is neither an exported model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    assert main(["encode", "--checkpoint", str(exported_vae), "--data", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err

    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test-secret"}.items():
        monkeypatch.setenv(key, value)
    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["encode", "--checkpoint", str(exported_vae), "--data", f"{fashion_shards}#val",
                 "--out", "s3://bucket/latents", f"s3.endpoint_url={dead}", "s3.max_attempts=1",
                 "s3.connect_timeout_s=2"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach S3 endpoint" in err and "test-secret" not in err
    assert main(["latent-stats", "--checkpoint", str(exported_vae), "--data", f"{fashion_shards}#val",
                 "--max-images", "-1", "data.num_workers=0"]) == 2
    assert "--max-images must be >= 0" in capsys.readouterr().err
