"""LPIPS (VGG variant): the perceptual distance of Zhang et al. 2018, with gradients, no download.

Usage::

    from vae_train.model.perceptual import build_lpips

    lpips = build_lpips("/models/vgg16-397923af.pth")   # or None: torchvision's cache
    d = lpips(x, y)                                      # [B] distances; x, y in [-1, 1]
    d.mean().backward()                                  # gradients reach x and y, not LPIPS

The network is the ``lpips`` package's ``LPIPS(net="vgg", version="0.1")``: torchvision's
VGG16 ``features`` up to ``relu5_3``, activations at relu1_2 / relu2_2 / relu3_3 /
relu4_3 / relu5_3, each unit-normalised over channels, squared differences weighted
by the package's learned 1x1 "linear heads" and averaged over positions, summed over
the five layers.

Why the VGG stack is written here instead of imported: ``lpips`` builds it through
torchvision, and torchvision's PyPI wheels do not import beside the CPU torch pin
(``operator torchvision::nms does not exist``), so ``import lpips`` fails on such
machines. The module below uses torchvision's parameter names (``features.N.weight``),
so torchvision's own ``vgg16-397923af.pth`` loads into it unchanged, and it reads the
linear heads from the files the ``lpips`` wheel ships (``lpips/weights/v0.1/vgg.pth``,
loaded with ``weights_only=True``) without importing the package.

Backbone weights are ImageNet weights a user supplies: ``backbone_path``, else
torchvision's cache ``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``. When neither
exists :func:`build_lpips` raises an error naming both: never a download, which would
hang on an air-gapped cluster. :attr:`LPIPS.imagenet_backbone` says whether the file is
torchvision's (its name's hash prefix ``397923af`` is the start of the file's SHA-256):
a run with any other backbone (a random one in tests and CPU demos) prints LPIPS values
that are not comparable with published ones, and says so.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from vae_train.model.errors import ModelError
from vae_train.model.weights_file import sha256_prefix

VGG16_FILE = "vgg16-397923af.pth"
"""torchvision's ImageNet VGG16 weights; the suffix is the first 8 hex digits of the file's SHA-256."""
_VGG16_SHA256_PREFIX = "397923af"
_LPIPS_HEADS = "lpips/weights/v0.1/vgg.pth"
# VGG16 "features": conv widths, "M" = 2x2 max-pool (torchvision's configuration "D").
_VGG16_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
# Indices in ``features`` after which LPIPS reads an activation (relu1_2 ... relu5_3).
_TAPS = (3, 8, 15, 22, 29)
_WIDTHS = (64, 128, 256, 512, 512)
# LPIPS v0.1's input scaling (ImageNet statistics in [-1, 1] units).
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class PerceptualWeightsError(ModelError):
    """LPIPS cannot be built: backbone or linear-head weights are missing or do not fit."""


def default_backbone_path() -> Path:
    """Where torchvision caches VGG16: ``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth`` (no download)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def resolve_backbone_path(backbone_path: str | None) -> Path:
    """The VGG16 weights file to use, or an error naming both places looked at."""
    if backbone_path:
        path = Path(backbone_path).expanduser()
        if path.is_file():
            return path
        raise PerceptualWeightsError(
            f"loss.lpips_backbone_path={backbone_path!r} does not exist; LPIPS needs torchvision's ImageNet VGG16 "
            f"weights ({VGG16_FILE}); point loss.lpips_backbone_path at a copy, or set loss.perceptual_weight=0")
    cached = default_backbone_path()
    if cached.is_file():
        return cached
    raise PerceptualWeightsError(
        f"LPIPS needs torchvision's ImageNet VGG16 weights and none were found: loss.lpips_backbone_path is empty "
        f"and torchvision's cache {cached} does not exist (TORCH_HOME={os.environ.get('TORCH_HOME', '<unset>')}). "
        f"Nothing is downloaded: copy {VGG16_FILE} to one of them (or set loss.lpips_backbone_path), "
        "or set loss.perceptual_weight=0")


def lpips_heads_path() -> Path:
    """The ``lpips`` wheel's VGG linear-head file, found without importing the package (see module doc)."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("lpips")
    except importlib.metadata.PackageNotFoundError:
        raise PerceptualWeightsError(
            "LPIPS needs the linear heads shipped by the 'lpips' package, which is not installed; install it "
            "without its torchvision dependency: pip install --no-deps lpips==0.1.4") from None
    path = Path(str(dist.locate_file(_LPIPS_HEADS)))
    if not path.is_file():
        raise PerceptualWeightsError(f"the installed 'lpips' package has no {_LPIPS_HEADS}; reinstall lpips==0.1.4")
    return path


def _vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features[:30]`` (through relu5_3), same module indices and names."""
    layers: list[nn.Module] = []
    width = 3
    for item in _VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(width, int(item), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            width = int(item)
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """LPIPS-VGG v0.1 distance; frozen (no trainable parameters), always in eval mode.

    ``forward(x, y)`` takes two ``[B, C, H, W]`` batches in [-1, 1] and returns ``[B]``.
    Grayscale (C=1) is repeated to RGB; C=3 is RGB; any other C is scored per channel
    (each channel as a grayscale image) and averaged, so every channel count is defined.
    Computed in the module's dtype (float32 unless moved), whatever the input dtype.
    """

    def __init__(self, features: nn.Sequential, heads: list[torch.Tensor], imagenet_backbone: bool,
                 source: str) -> None:
        super().__init__()
        self.features = features
        self.heads = nn.ParameterList([nn.Parameter(w, requires_grad=False) for w in heads])
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.imagenet_backbone = imagenet_backbone
        self.source = source
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        """Stays in eval mode: LPIPS is a fixed metric, never trained."""
        return super().train(False)

    def _distance_rgb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        h = (torch.cat([x, y]) - self.shift) / self.scale  # one pass over both images
        total = torch.zeros(batch, dtype=h.dtype, device=h.device)
        tap = 0
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index == _TAPS[tap]:
                feats = h / (h.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
                diff = (feats[:batch] - feats[batch:]).square()
                total = total + F.conv2d(diff, self.heads[tap]).mean(dim=(1, 2, 3))
                tap += 1
                if tap == len(_TAPS):
                    break
        return total

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.dim() != 4:
            raise ValueError(f"LPIPS compares two [B, C, H, W] batches of one shape, got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        dtype = self.shift.dtype
        x, y = x.to(dtype), y.to(dtype)
        channels = x.shape[1]
        if channels == 3:
            return self._distance_rgb(x, y)
        per_channel = [self._distance_rgb(x[:, c:c + 1].expand(-1, 3, -1, -1), y[:, c:c + 1].expand(-1, 3, -1, -1))
                       for c in range(channels)]
        return torch.stack(per_channel).mean(dim=0)


def build_lpips(backbone_path: str | None) -> LPIPS:
    """LPIPS-VGG with the backbone at ``backbone_path`` (or torchvision's cache) and the lpips heads.

    Raises :class:`PerceptualWeightsError` naming what is missing; never downloads.
    """
    path = resolve_backbone_path(backbone_path)
    heads_file = lpips_heads_path()
    features = _vgg16_features()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same message
        raise PerceptualWeightsError(f"cannot read VGG16 weights {path}: {exc}") from None
    wanted = {f"features.{k}": v for k, v in features.state_dict().items()}
    missing = [k for k in wanted if k not in state]
    if missing:
        raise PerceptualWeightsError(
            f"{path} is not a torchvision VGG16 state dict (missing {', '.join(missing[:3])}...); LPIPS needs "
            f"torchvision's {VGG16_FILE}")
    bad = [k for k, v in wanted.items() if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise PerceptualWeightsError(f"{path}: {bad[0]} has shape {tuple(state[bad[0]].shape)}, VGG16 needs "
                                     f"{tuple(wanted[bad[0]].shape)}")
    features.load_state_dict({k.removeprefix("features."): state[k].float() for k in wanted})
    heads_state = torch.load(heads_file, map_location="cpu", weights_only=True)
    heads = []
    for index, width in enumerate(_WIDTHS):
        weight = heads_state.get(f"lin{index}.model.1.weight")
        if weight is None or tuple(weight.shape) != (1, width, 1, 1):
            raise PerceptualWeightsError(f"{heads_file} lacks the linear head lin{index} of shape (1, {width}, 1, 1)")
        heads.append(weight.float())
    imagenet = path.name == VGG16_FILE and sha256_prefix(path) == _VGG16_SHA256_PREFIX
    return LPIPS(features, heads, imagenet, str(path))


def save_random_vgg16(path: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised VGG16 in torchvision's layout, for tests and CPU demos without ImageNet weights.

    He-scaled conv weights keep activations O(1) through the 13 layers, so LPIPS built on
    it is a usable (if not perceptual) image distance; :class:`LPIPS` reports
    ``imagenet_backbone=False`` for it and runs say their LPIPS is not comparable.
    """
    gen = torch.Generator().manual_seed(seed)
    state = {f"features.{k}": v for k, v in _vgg16_features().state_dict().items()}
    for key, value in state.items():
        if key.endswith(".weight"):
            fan_in = value.shape[1] * 9
            state[key] = torch.randn(value.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        else:
            state[key] = torch.randn(value.shape, generator=gen) * 0.01
    state["classifier.0.weight"] = torch.randn(8, 8, generator=gen)  # torchvision's file has one; the loader ignores it
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path
