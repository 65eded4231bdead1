"""Test-side launcher: the real ``vae-train train`` entry with a NaN loss on one rank in one step.

Usage (under any launcher, in place of ``train.py``)::

    accelerate launch --config_file launch/accelerate_cpu.yaml tests/integration/nan_train.py RANK:STEP --config ... [k=v ...]

The fault enters through the trainer's seam :func:`vae_train.trainer.train_step`:
in optimizer step STEP (0-based) on rank RANK, the loss function it is given returns
its loss multiplied by NaN. Everything else (the gate's all-reduce, the skip on
every rank, the logs) is the real trainer's. Library code knows nothing of this.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any


def inject_nan(rank: int, step: int) -> None:
    """Make rank ``rank``'s loss NaN in optimizer step ``step`` of every later ``train()``."""
    from vae_train import trainer

    real_train_step = trainer.train_step

    def train_step(engine: Any, batches: Any, at_step: int, loss_fn: Any, **kwargs: Any) -> Any:
        if (engine.env.rank, at_step) == (rank, step):
            clean_loss_fn = loss_fn

            def loss_fn(out: Any) -> Any:
                terms = clean_loss_fn(out)
                return dataclasses.replace(terms, loss=terms.loss * float("nan"))

        return real_train_step(engine, batches, at_step, loss_fn, **kwargs)

    trainer.train_step = train_step


def _parse(spec: str) -> tuple[int, int]:
    rank, sep, step = spec.partition(":")
    if not sep or not rank.isdigit() or not step.isdigit():
        raise SystemExit(f"first argument must be RANK:STEP (e.g. 1:3), got {spec!r}")
    return int(rank), int(step)


if __name__ == "__main__":
    from vae_train.cli import main

    inject_nan(*_parse(sys.argv[1]))
    argv = [arg for arg in sys.argv[2:] if not arg.startswith("--local_rank")]
    sys.exit(main(["train", *argv]))
