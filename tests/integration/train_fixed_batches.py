"""``train.py`` whose batches and noise depend only on (step, the sample's place in the global batch).

Run it like ``train.py``, as a module from the repository root
(``torchrun ... -m tests.integration.train_fixed_batches --config ...``),
with ``train.grad_accum_steps=1`` and validation/image grids off. Test-side substitution
(the library has no such hook), for the ZeRO / world-size equivalence tests:

- each micro-batch the trainer gives ``ConvVAE.forward`` in training mode is replaced by
  :func:`fixed_batch` for its samples' global indices ``rank * micro + i``: binarized real
  Fashion-MNIST images and their reparameterization noise ``eps`` (passed to the real op,
  fused when built), both a pure function of (step, global index);
- so 1 rank with a micro-batch of 16 and 2 ranks with 8 each see the same 16 images with the
  same noise, and a single-process reference (:func:`fixed_batch` for indices ``0..15``)
  can replay the run without DeepSpeed;
- the learning rate every optimizer update used, read from the optimizer's param groups
  inside ``torch.optim.AdamW.step`` / ``Adam.step`` (what is applied, not what is logged),
  is written to ``$VAE_TEST_RECORD_DIR/lr.rank{RANK}.json`` when the run ends.

Everything else -- data stream, engine, DeepSpeed ZeRO, the step gate, logging,
checkpoints -- is the product, unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from tests.fixtures.trained_vae import read_fashion_mnist

POOL = 1024  # images of the Fashion-MNIST train split the batches draw from
_SEED_STRIDE = 1_000_003


def _pool() -> torch.Tensor:
    images, _ = read_fashion_mnist("train", POOL)
    return torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)


_POOL: torch.Tensor | None = None


def fixed_batch(step: int, indices: range, latent_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Binarized images ``[n, 1, 28, 28]`` and float32 noise ``[n, *latent_shape]`` for global ``indices`` of ``step``."""
    global _POOL
    if _POOL is None:
        _POOL = _pool()
    images, noise = [], []
    for index in indices:
        g = torch.Generator().manual_seed(step * _SEED_STRIDE + index)
        picked = int(torch.randint(0, POOL, (), generator=g))
        images.append(torch.bernoulli(_POOL[picked], generator=g))
        noise.append(torch.randn(latent_shape, generator=g))
    return torch.stack(images), torch.stack(noise)


@contextlib.contextmanager
def noise_from(eps: torch.Tensor) -> Iterator[None]:
    """While active, ``ConvVAE.forward`` passes ``eps`` (cast to the latent's dtype) to the reparameterization op."""
    from vae_train.model import vae

    original = vae.reparam_kl

    def with_eps(mu, logvar, eps_arg=None, generator=None, **kwargs):
        return original(mu, logvar, eps.to(mu.device, mu.dtype), **kwargs)

    vae.reparam_kl = with_eps
    try:
        yield
    finally:
        vae.reparam_kl = original


def _install(rank: int, applied_lrs: list[float]) -> None:
    from vae_train.model import ConvVAE

    original_forward = ConvVAE.forward
    steps = {"training_calls": 0}

    def forward(self, x, generator=None, **kwargs):
        if not self.training:
            return original_forward(self, x, generator, **kwargs)
        step = steps["training_calls"]
        steps["training_calls"] += 1
        n = x.shape[0]
        images, eps = fixed_batch(step, range(rank * n, (rank + 1) * n), tuple(self.latent_shape))
        with noise_from(eps):
            return original_forward(self, images.to(x.device, x.dtype), generator, **kwargs)

    ConvVAE.forward = forward

    for cls in (torch.optim.AdamW, torch.optim.Adam):
        original_step = cls.step

        def step(self, closure=None, _original=original_step):
            applied_lrs.append(float(self.param_groups[0]["lr"]))
            return _original(self, closure)

        cls.step = step


def main() -> None:
    rank = int(os.environ.get("RANK", "0"))
    record_dir = Path(os.environ["VAE_TEST_RECORD_DIR"])
    applied_lrs: list[float] = []
    _install(rank, applied_lrs)
    os.chdir(Path(__file__).resolve().parents[2])
    try:
        runpy.run_path("train.py", run_name="__main__")
    finally:
        record_dir.mkdir(parents=True, exist_ok=True)
        (record_dir / f"lr.rank{rank}.json").write_text(json.dumps(applied_lrs))


if __name__ == "__main__":
    main()
