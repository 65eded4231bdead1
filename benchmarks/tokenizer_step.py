"""Step time of the full autoencoder objective against reconstruction-only, at 64x64, side by side.

Goal: know what the latent-diffusion recipe costs per optimizer step over a plain
reconstruction autoencoder on the same model and batch, as a ratio:

* ``recon-only``: ``loss.pixel=l1`` + KL (the objective with every extra off);
* ``+ LPIPS``: the VGG16 perceptual term (forward and backward through VGG16);
* ``full``: + the PatchGAN (generator pass with the adaptive weight's two extra
  partial backwards, then the discriminator's own forward/backward/step) + the EMA update.

Every variant is the library's real code (``AutoencoderObjective``, ``LastLayerTap``,
``PatchDiscriminator``, ``EMA``, LPIPS from ``build_lpips``) with ``torch.optim.Adam``
in one process -- no DeepSpeed, so the same script runs on a GPU machine that lacks it.
LPIPS gets a random VGG16 (the cost does not depend on the weights). The variants run
in interleaved rounds (A B C A B C ...) and each reports its median step time, so drift
on a shared machine hits all of them alike.

Run: ``python benchmarks/tokenizer_step.py [--device cpu|cuda] [--batch 8] [--steps 5] [--rounds 3]``;
on the GPU machine the GPU check's ``tokenizer_step`` stage calls :func:`measure`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vae_train.config import LossConfig, ModelConfig  # noqa: E402
from vae_train.ema import EMA  # noqa: E402
from vae_train.losses import AutoencoderObjective, LastLayerTap  # noqa: E402
from vae_train.model import ConvVAE  # noqa: E402
from vae_train.model.discriminator import PatchDiscriminator  # noqa: E402
from vae_train.model.perceptual import build_lpips, save_random_vgg16  # noqa: E402

MODEL = ModelConfig(in_channels=3, image_size=64, base_channels=32, channel_mult=[1, 2, 2, 4], num_res_blocks=1,
                    latent_channels=4, norm_groups=8, likelihood="gaussian_fixed", reparam="reference")


class Variant:
    """One objective with its own model, optimizers (and discriminator / EMA when on)."""

    def __init__(self, name: str, loss: LossConfig, lpips: torch.nn.Module | None, device: torch.device,
                 ema: bool) -> None:
        torch.manual_seed(0)
        self.name = name
        self.model = ConvVAE(MODEL).to(device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4, betas=(0.5, 0.9))
        self.objective = AutoencoderObjective(loss, lpips if loss.perceptual_weight > 0 else None)
        self.disc = PatchDiscriminator(3).to(device) if loss.disc_weight > 0 else None
        self.disc_opt = torch.optim.Adam(self.disc.parameters(), lr=1e-4, betas=(0.5, 0.9)) if self.disc else None
        self.tap = LastLayerTap(self.model.last_decoder_layer()) if self.disc else None
        self.ema = EMA(self.model, 0.999) if ema else None
        self.times: list[float] = []

    def step(self, x: torch.Tensor, step: int) -> None:
        out = self.model(x, check_range=False)
        if self.disc is not None:
            self.disc.requires_grad_(False)
        terms = self.objective.generator_terms(self.model, x, out.x_params, out.kl, 1e-6, self.disc, self.tap)
        if self.disc is not None:
            self.disc.requires_grad_(True)
        self.opt.zero_grad(set_to_none=True)
        terms.loss.backward()
        self.opt.step()
        if self.disc is not None and self.disc_opt is not None:
            d_loss, _, _ = self.objective.discriminator_terms(self.disc, x, out.x_params)
            self.disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.disc_opt.step()
        if self.ema is not None:
            self.ema.update(step)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(device: torch.device, batch: int, steps: int, rounds: int) -> list[tuple[str, float]]:
    """``(variant, median step seconds)`` of the three objectives, interleaved (also the GPU check's stage)."""
    with tempfile.TemporaryDirectory() as tmp:
        lpips = build_lpips(str(save_random_vgg16(Path(tmp) / "vgg16-random.pth"))).to(device)
    variants = [
        Variant("recon-only (l1 + KL)", LossConfig(pixel="l1"), None, device, ema=False),
        Variant("+ LPIPS", LossConfig(pixel="l1", perceptual_weight=1.0), lpips, device, ema=False),
        Variant("full (+ PatchGAN, adaptive weight, EMA)",
                LossConfig(pixel="l1", perceptual_weight=1.0, disc_weight=0.5, disc_start=0), lpips, device, ema=True),
    ]
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, 3, 64, 64, generator=gen) * 2 - 1).to(device)
    for variant in variants:  # warm-up (allocator, kernels)
        variant.step(x, 0)
    for _ in range(rounds):
        for variant in variants:
            for step in range(steps):
                _sync(device)
                start = time.perf_counter()
                variant.step(x, step + 1)
                _sync(device)
                variant.times.append(time.perf_counter() - start)
    return [(variant.name, statistics.median(variant.times)) for variant in variants]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = measure(device, args.batch, args.steps, args.rounds)
    base = rows[0][1]
    print(f"device={device} batch={args.batch} image=64x64 model={MODEL.channel_mult} threads={torch.get_num_threads()} "
          f"rounds={args.rounds}x{args.steps} steps")
    print(f"{'objective':44s} {'median step ms':>15s} {'ratio to recon-only':>20s}")
    for name, median in rows:
        print(f"{name:44s} {median * 1e3:15.1f} {median / base:20.2f}")


if __name__ == "__main__":
    main()
