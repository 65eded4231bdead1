"""The FID Inception-v3 network (the TensorFlow 2015-12-05 graph), for rFID pool features.

rFID figures are only comparable when every implementation runs the *same*
network: the one TensorFlow's original FID code used, whose weights pytorch-fid
and torchmetrics/torch-fidelity ship as ``pt_inception-2015-12-05-6726825d.pth``.
That graph differs from torchvision's Inception-v3 in three places (average
pools that do not count padding in the A, C and first E blocks; a max pool in
the last E block's pool branch; a 1008-way classifier). pytorch-fid builds it on
top of torchvision, which does not import beside the CPU torch of these machines,
and torch-fidelity downloads it; so it is written out here, with the state-dict
keys of that file (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``,
... ``fc.weight``), loaded strictly: a file with other keys or shapes is refused.

The weights are never downloaded: :func:`load_fid_inception` reads a local file
(``--inception-weights`` / ``eval.inception_weights``) or the file pytorch-fid
caches at ``$TORCH_HOME/hub/checkpoints/``, with ``torch.load(weights_only=True)``.

Protocol of :meth:`FIDInceptionV3.forward` (pytorch-fid's): ``uint8`` RGB
``[B, 3, H, W]`` -> float in [0, 1] -> bilinear resize to 299x299
(``F.interpolate(mode="bilinear", align_corners=False, antialias=False)``; no
resize when the image already is 299x299) -> scaled to [-1, 1] -> the 2048-d
global average pool of the last block.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vae_train.model.errors import ModelError
from vae_train.model.weights_file import sha256_prefix

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
_FID_WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub's convention: the name ends with the file's SHA-256 prefix
INPUT_SIZE = 299
FEATURES = 2048
_CLASSES = 1008  # the 2015 graph's classifier: 1000 ImageNet classes + 8 unused


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, as the TF graph), ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average pool whose border windows average only real pixels (the TF graph)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _BlockA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], 1)


class _BlockB(nn.Module):
    """35 -> 17 reduction."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class _BlockC(nn.Module):
    """17x17 block with factorized 7x7 convolutions (``c7`` channels inside)."""

    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            dbl = layer(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg_pool(x)),
        ], 1)


class _BlockD(nn.Module):
    """17 -> 8 reduction."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockE(nn.Module):
    """8x8 block with split 1x3 / 3x1 branches; ``max_pool`` selects the last block's pool branch."""

    def __init__(self, cin: int, *, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(pooled),
        ], 1)


class FIDInceptionV3(nn.Module):
    """uint8 RGB images ``[B, 3, H, W]`` -> float32 pool features ``[B, 2048]`` (always in eval mode).

    ``num_features`` tells torchmetrics' ``FrechetInceptionDistance`` the feature
    size without a dummy forward pass.
    """

    num_features = FEATURES
    published_weights = False
    """True when loaded from the published file (name and SHA-256 prefix match): only then are rFID
    figures comparable with other papers' and tools' (tests and CPU demos use random weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = _BlockA(192, pool_features=32)
        self.Mixed_5c = _BlockA(256, pool_features=64)
        self.Mixed_5d = _BlockA(288, pool_features=64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b = _BlockC(768, c7=128)
        self.Mixed_6c = _BlockC(768, c7=160)
        self.Mixed_6d = _BlockC(768, c7=160)
        self.Mixed_6e = _BlockC(768, c7=192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b = _BlockE(1280, max_pool=False)
        self.Mixed_7c = _BlockE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURES, _CLASSES)  # unused: present so the weights file loads strictly
        self.eval()

    def train(self, mode: bool = True) -> "FIDInceptionV3":
        """A fixed feature extractor: batch norm always uses the stored statistics."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ModelError(f"the FID Inception network takes uint8 RGB [B, 3, H, W] images, got "
                             f"{images.dtype} {tuple(images.shape)}")
        x = images.to(self.fc.weight.dtype) / 255.0
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=False)
        x = 2.0 * x - 1.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3)).float()


def default_weights_path() -> Path:
    """Where pytorch-fid's download lands: ``$TORCH_HOME/hub/checkpoints/pt_inception-...pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_NAME


def load_fid_inception(path: str | os.PathLike[str] | None = None, device: torch.device | str = "cpu") -> FIDInceptionV3:
    """The FID Inception network with the weights at ``path`` (or pytorch-fid's cache when empty).

    Never downloads (the clusters this runs on are air-gapped): an absent file is
    a :class:`ModelError` naming both places it looked and where to get the file.
    """
    explicit = bool(path)
    file = Path(path) if explicit else default_weights_path()
    if not file.is_file():
        where = f"{str(file)!r} does not exist" if explicit else (
            f"no --inception-weights / eval.inception_weights was given and pytorch-fid's cache {str(file)!r} is empty")
        raise ModelError(
            f"rFID needs the FID Inception weights ({FID_WEIGHTS_NAME}, the file pytorch-fid and torchmetrics use): "
            f"{where}. Copy that file onto this machine (it is published with pytorch-fid's releases) and pass "
            f"--inception-weights PATH (or set eval.inception_weights); it is never downloaded here")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or foreign file: the message must name it
        raise ModelError(f"cannot read the FID Inception weights {str(file)!r}: {exc}") from None
    if not isinstance(state, dict):
        raise ModelError(f"{str(file)!r} does not hold a state dict (got {type(state).__name__})")
    net = FIDInceptionV3()
    expected = net.state_dict()
    for key in expected:  # files saved before batch norm counted its updates lack these (unused in eval)
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, expected[key])
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        raise ModelError(
            f"{str(file)!r} is not the FID Inception state dict ({FID_WEIGHTS_NAME}): {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} with other shapes {wrong[:3]}")
    net.load_state_dict(state, strict=True)
    net.published_weights = file.name == FID_WEIGHTS_NAME and sha256_prefix(file) == _FID_WEIGHTS_SHA256_PREFIX
    return net.to(device)


