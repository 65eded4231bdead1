"""What a training run shows: TensorBoard events, a progress bar, console lines, image grids.

Only global rank 0 writes (one event file, one progress bar); on other ranks
:class:`RunLogger` is inert, so the trainer calls it unconditionally and reads
straight. TensorBoard layout under ``{run_dir}/tb/``:

* ``train/{loss,recon,kl,beta,lr,grad_norm,skipped_steps,images_per_s,
  data_wait_fraction,bits_per_dim,active_channels}`` scalars,
* ``val/*`` scalars: every metric of :func:`vae_train.evaluate.evaluate_stream`
  (``nelbo_nats``, ``nelbo_bpd``, ``recon_nats``, ``kl_nats``, ``active_channels``, ``psnr_db``, ...),
* ``images/reconstructions`` (inputs beside their reconstructions, in pairs) and
  ``images/samples`` (from the prior) grids,
* ``latent/kl_per_channel`` histogram: a channel whose KL sits near zero
  carries no information (posterior collapse); ``train/active_channels`` counts
  the channels above ``logging.active_unit_threshold``.

``metrics.jsonl`` in the run directory repeats every logged row as JSON, for
scripts and tests that should not parse event files. With ``logging.wandb.enabled``
the same scalars and image grids, and the resolved config, also go to wandb
(:mod:`vae_train.wandb_tracker`; offline by default).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vae_train.config import LoggingConfig

log = logging.getLogger("vae_train")


def setup_console(rank: int) -> None:
    """Console logging: INFO on rank 0, warnings (tagged with the rank) elsewhere."""
    root = logging.getLogger("vae_train")
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False


def image_grid(images: torch.Tensor, value_range: tuple[float, float], ncol: int = 8, pad: int = 2) -> np.ndarray:
    """``[N, C, H, W]`` images -> one ``uint8`` grid ``[rows*(H+pad)+pad, ncol*(W+pad)+pad, 3]``.

    Pixels are mapped from the likelihood's ``value_range`` to 0..255; grayscale
    is repeated to RGB so TensorBoard and PNG viewers agree.
    """
    lo, hi = value_range
    x = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = x[:, :3]
    n, _, h, w = x.shape
    ncol = max(1, min(ncol, n))
    rows = math.ceil(n / ncol)
    grid = torch.ones(3, rows * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[:, top : top + h, left : left + w] = x[i]
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def pairs_grid(inputs: torch.Tensor, recons: torch.Tensor, value_range: tuple[float, float], pairs_per_row: int = 8) -> np.ndarray:
    """Each input immediately followed by its reconstruction, ``pairs_per_row`` pairs per row."""
    n = min(len(inputs), len(recons))
    both = torch.stack([inputs[:n].float(), recons[:n].float()], dim=1).flatten(0, 1)
    return image_grid(both, value_range, ncol=2 * pairs_per_row)


DIFF_GAIN = 4.0
"""How much :func:`diff_grid` amplifies reconstruction errors (so small errors are visible)."""


def diff_grid(inputs: torch.Tensor, recons: torch.Tensor, value_range: tuple[float, float], rows: int = 8) -> np.ndarray:
    """One row per image: input | reconstruction | ``DIFF_GAIN`` x the absolute difference (black = exact)."""
    n = min(len(inputs), len(recons), rows)
    lo, hi = value_range
    x, r = inputs[:n].float().cpu(), recons[:n].float().cpu()
    diff = (lo + DIFF_GAIN * (x - r).abs()).clamp(lo, hi)
    return image_grid(torch.stack([x, r, diff], dim=1).flatten(0, 1), value_range, ncol=3)


def save_png(grid: np.ndarray, path: str | Path, *, min_width: int = 0) -> Path:
    """Write an RGB ``uint8`` grid ``[H, W, 3]`` as PNG (creating the directory).

    A grid narrower than ``min_width`` pixels is enlarged by the smallest whole factor
    that reaches it, each pixel becoming a square block (no interpolation blurs binary
    pixels): a grid of 28x28 images is ~240 px wide, too small to see on a screen.
    """
    from PIL import Image

    if min_width > grid.shape[1]:
        factor = -(-min_width // grid.shape[1])
        grid = grid.repeat(factor, axis=0).repeat(factor, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


class RunLogger:
    """TensorBoard + progress bar + metrics.jsonl on rank 0; does nothing on other ranks."""

    def __init__(self, run_dir: str | Path, cfg: LoggingConfig, *, max_steps: int, start_step: int, is_main: bool,
                 run_config: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.is_main = is_main
        self.run_dir = Path(run_dir)
        self.tb_dir = self.run_dir / "tb"
        self._writer: Any = None
        self._bar: Any = None
        self._jsonl: Any = None
        self._wandb: Any = None
        if not is_main:
            return
        if cfg.wandb.enabled:
            from vae_train.wandb_tracker import WandbTracker

            self._wandb = WandbTracker(cfg.wandb, run_dir, run_config or {})
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.tb_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.tb_dir))
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._bar = tqdm(
            total=max_steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not cfg.progress_bar,
            file=sys.stderr,
        )

    def info(self, message: str) -> None:
        """A console line that does not tear the progress bar."""
        if not self.is_main:
            return
        if self._bar is not None and not self._bar.disable:
            self._bar.write(message, file=sys.stderr)
        else:
            log.info(message)

    def scalars(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        """``{prefix}/{name}`` scalars at ``step`` and one metrics.jsonl row."""
        if not self.is_main:
            return
        for name, value in values.items():
            self._writer.add_scalar(f"{prefix}/{name}", value, step)
        row = {"step": step, "split": prefix, **{k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._wandb is not None:
            self._wandb.scalars(step, values, prefix)

    def progress(self, step: int, loss: float) -> None:
        """Advance the bar to ``step`` and show the current loss (ETA comes from tqdm)."""
        if self._bar is None:
            return
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix(loss=f"{loss:.4g}", refresh=False)

    def latent_histogram(self, step: int, kl_per_channel: torch.Tensor) -> int:
        """Histogram of mean KL per latent channel; returns (and logs) the active-channel count."""
        active = int((kl_per_channel > self.cfg.active_unit_threshold).sum())
        if self.is_main:
            self._writer.add_histogram("latent/kl_per_channel", kl_per_channel.detach().float().cpu(), step)
            self._writer.add_scalar("train/active_channels", active, step)
        return active

    def images(self, step: int, grids: dict[str, np.ndarray]) -> None:
        """``images/{name}`` grids (HWC uint8)."""
        if not self.is_main:
            return
        for name, grid in grids.items():
            self._writer.add_image(f"images/{name}", grid, step, dataformats="HWC")
        if self._wandb is not None:
            self._wandb.images(step, grids)

    def close(self) -> None:
        if not self.is_main:
            return
        self._bar.close()
        self._writer.flush()
        self._writer.close()
        self._jsonl.close()
        if self._wandb is not None:
            self._wandb.close()
