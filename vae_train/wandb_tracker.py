"""Weights & Biases beside TensorBoard (``logging.wandb``), for rank 0's :class:`vae_train.logging.RunLogger`.

Why offline by default: the clusters this trains on are often air-gapped. Offline
mode writes everything under ``{run_dir}/wandb`` (``logging.wandb.dir``) and needs
no network and no account; ``wandb sync {run_dir}/wandb/wandb/offline-run-*``
uploads it later from a machine that has both. ``WANDB_MODE`` in the environment
overrides ``logging.wandb.mode`` (wandb's own convention).

What is logged: the resolved config (as written to ``config.yaml``), every scalar
row the run logger writes to TensorBoard (``train/*``, ``val/*``...) at its step,
and the image grids (``images/*``). Credentials never enter the config, so they
cannot reach the logged config; online mode finds ``WANDB_API_KEY`` / ``~/.netrc``
itself. Code saving is off (the run records the package version in its config).

Resume: the run id is kept in ``{dir}/run_id``, so a resumed training run
continues the same wandb run (``resume="allow"``) instead of starting a new one.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from vae_train.config import WandbConfig
from vae_train.errors import VaeTrainError


class TrackerError(VaeTrainError):
    """The configured tracker cannot start (package missing...)."""


def check_available(cfg: WandbConfig) -> None:
    """Fail at start-up, on every rank, when wandb is enabled but not installed."""
    if not cfg.enabled:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise TrackerError("logging.wandb.enabled=true needs the wandb package: pip install 'vae-train[wandb]' "
                           "(or set logging.wandb.enabled=false)") from None


class WandbTracker:
    """One wandb run: scalars, image grids, the config. Create it on rank 0 only."""

    def __init__(self, cfg: WandbConfig, run_dir: str | Path, run_config: dict[str, Any]) -> None:
        check_available(cfg)
        import wandb

        root = Path(cfg.dir) if cfg.dir else Path(run_dir) / "wandb"
        root.mkdir(parents=True, exist_ok=True)
        id_file = root / "run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self._wandb = wandb
        self._run = wandb.init(
            project=cfg.project,
            entity=cfg.entity or None,
            name=cfg.name or Path(run_dir).resolve().name,
            tags=list(cfg.tags) or None,
            dir=str(root),
            id=run_id,
            resume="allow",
            mode=os.environ.get("WANDB_MODE") or cfg.mode,
            config=run_config,
            settings=wandb.Settings(save_code=False, console="off"),
        )
        self.run_id = run_id

    def scalars(self, step: int, values: dict[str, float], prefix: str) -> None:
        self._run.log({f"{prefix}/{name}": value for name, value in values.items()}, step=step)

    def images(self, step: int, grids: dict[str, np.ndarray]) -> None:
        self._run.log({f"images/{name}": self._wandb.Image(grid) for name, grid in grids.items()}, step=step)

    def close(self) -> None:
        """Finish the run and wait for wandb's service to write (or upload) everything: the files are
        complete when this returns, even if the process ends at once (atexit hooks are not reliable
        under launchers that kill their children)."""
        self._run.finish()
        self._wandb.teardown()
