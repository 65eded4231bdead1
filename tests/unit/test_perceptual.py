"""LPIPS against an independent float64 computation, with a random VGG16 saved to a file.

No pretrained weights exist on these machines: the backbone is a randomly initialised
VGG16 in torchvision's state-dict layout (``features.N.weight`` plus a classifier the
loader must ignore), which is exactly what a user's ``vgg16-397923af.pth`` looks like.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from vae_train.model.perceptual import (
    VGG16_FILE,
    PerceptualWeightsError,
    build_lpips,
    lpips_heads_path,
)

def reference_lpips(x: torch.Tensor, y: torch.Tensor, vgg_path: str) -> torch.Tensor:
    """LPIPS-VGG v0.1 written out in float64 from the published definition, one image pair at a time."""
    state = {k: v.double() for k, v in torch.load(vgg_path, map_location="cpu", weights_only=True).items()}
    heads = torch.load(lpips_heads_path(), map_location="cpu", weights_only=True)
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)
    blocks = [[0, 2], [5, 7], [10, 12, 14], [17, 19, 21], [24, 26, 28]]  # relu1_2 ... relu5_3

    def taps(img: torch.Tensor) -> list[torch.Tensor]:
        h = (img.double() - shift) / scale
        out = []
        for level, convs in enumerate(blocks):
            if level:
                h = F.max_pool2d(h, 2)
            for index in convs:
                h = F.relu(F.conv2d(h, state[f"features.{index}.weight"], state[f"features.{index}.bias"], padding=1))
            out.append(h)
        return out

    distances = []
    for i in range(x.shape[0]):
        a, b = x[i:i + 1], y[i:i + 1]
        if a.shape[1] == 1:
            a, b = a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)
        total = torch.zeros((), dtype=torch.float64)
        for level, (fa, fb) in enumerate(zip(taps(a), taps(b))):
            na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            w = heads[f"lin{level}.model.1.weight"].double().view(1, -1, 1, 1)
            total = total + ((na - nb).pow(2) * w).sum(1).mean()
        distances.append(total)
    return torch.stack(distances)


def test_lpips_matches_float64_reference_rgb_and_gray(random_vgg16) -> None:
    lpips = build_lpips(str(random_vgg16))
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 32, 32, generator=gen) * 2 - 1
    y = (x + 0.3 * torch.randn(3, 3, 32, 32, generator=gen)).clamp(-1, 1)
    got = lpips(x, y)
    assert got.shape == (3,)
    torch.testing.assert_close(got.double(), reference_lpips(x, y, str(random_vgg16)), rtol=1e-4, atol=1e-6)
    gray_x, gray_y = x[:, :1], y[:, :1]
    torch.testing.assert_close(lpips(gray_x, gray_y).double(), reference_lpips(gray_x, gray_y, str(random_vgg16)),
                               rtol=1e-4, atol=1e-6)
    assert torch.equal(lpips(x, x), torch.zeros(3))
    assert not lpips.imagenet_backbone  # a random file is not torchvision's: runs say LPIPS is not comparable


def test_lpips_gradients_reach_the_images_not_the_metric(random_vgg16) -> None:
    lpips = build_lpips(str(random_vgg16))
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    y = torch.rand(2, 3, 16, 16)
    lpips(x * 2 - 1, y * 2 - 1).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in lpips.parameters())
    lpips.train()
    assert not lpips.training  # a fixed metric: dropout-free eval mode always


def test_lpips_other_channel_counts_are_per_channel_means(random_vgg16) -> None:
    lpips = build_lpips(str(random_vgg16))
    x, y = torch.rand(2, 2, 16, 16) * 2 - 1, torch.rand(2, 2, 16, 16) * 2 - 1
    expected = (lpips(x[:, :1], y[:, :1]) + lpips(x[:, 1:], y[:, 1:])) / 2
    torch.testing.assert_close(lpips(x, y), expected)


def test_missing_weights_name_both_places_and_never_download(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(PerceptualWeightsError) as err:
        build_lpips(None)
    message = str(err.value)
    assert "loss.lpips_backbone_path" in message and str(tmp_path / "torch_home" / "hub" / "checkpoints") in message
    with pytest.raises(PerceptualWeightsError, match="does not exist"):
        build_lpips(str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(PerceptualWeightsError, match="not a torchvision VGG16"):
        build_lpips(str(bad))


def test_torchvision_cache_is_used_when_present(random_vgg16, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / VGG16_FILE).write_bytes(open(random_vgg16, "rb").read())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    lpips = build_lpips(None)
    assert lpips.source == str(cache / VGG16_FILE)
    assert not lpips.imagenet_backbone  # the right name but not the right bytes
