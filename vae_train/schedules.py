"""KL-weight (beta) and learning-rate schedules as pure functions of the global step.

Nothing here keeps state: ``beta_at(step, ...)`` and ``lr_multiplier_at(step, ...)``
depend only on the step and their config section, so a resumed run needs nothing but the
step it stopped at (the open_clip approach; a ``LambdaLR`` built from
:func:`build_lr_schedule` with ``last_epoch`` set from the step gives the same values).

KL schedules (``cfg.kl.schedule``), from ``beta_start`` at step 0 to ``beta``:

* ``constant``: ``beta`` at every step.
* ``linear``: a straight ramp over ``warmup_steps``, then ``beta``.
* ``sigmoid``: a logistic ramp over ``warmup_steps`` with ``sigmoid_steepness``,
  rescaled so it starts exactly at ``beta_start`` and ends exactly at ``beta``.
* ``cyclical`` (Fu et al. 2019, "Cyclical annealing schedule"): ``train.max_steps``
  is split into ``cycles`` equal periods; in each, beta ramps linearly over the first
  ``ramp_ratio`` of the period and stays at ``beta`` for the rest.

Free bits are not a schedule: they clamp the per-channel KL inside
:func:`vae_train.model.vae_loss`.

LR multiplier (``cfg.optimizer``; the optimizer's LR is ``lr * multiplier``): a
linear warm-up ``(step + 1) / warmup_steps`` (so step 0 already moves), then
``constant`` 1 or a ``cosine`` decay from 1 to ``min_lr_ratio`` at ``max_steps``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from vae_train.config import KLConfig, OptimizerConfig


def _ramp(progress: float, start: float, end: float) -> float:
    """``start`` -> ``end`` as ``progress`` goes 0 -> 1 (clipped)."""
    return start + (end - start) * min(1.0, max(0.0, progress))


def beta_at(step: int, kl: KLConfig, max_steps: int) -> float:
    """The KL weight at global ``step`` (0-based) for ``kl`` and a run of ``max_steps``."""
    step = max(0, step)
    if kl.schedule == "constant":
        return kl.beta
    if kl.schedule == "linear":
        if kl.warmup_steps == 0:
            return kl.beta
        return _ramp(step / kl.warmup_steps, kl.beta_start, kl.beta)
    if kl.schedule == "sigmoid":
        if kl.warmup_steps == 0:
            return kl.beta
        t = min(1.0, step / kl.warmup_steps)
        k = kl.sigmoid_steepness

        def sig(u: float) -> float:
            return 1.0 / (1.0 + math.exp(-u))

        low, high = sig(-k / 2), sig(k / 2)
        return _ramp((sig(k * (t - 0.5)) - low) / (high - low), kl.beta_start, kl.beta)
    if kl.schedule == "cyclical":
        period = max_steps / kl.cycles
        phase = (step % period) / period
        return _ramp(phase / kl.ramp_ratio, kl.beta_start, kl.beta)
    raise ValueError(f"unknown KL schedule {kl.schedule!r}")


def lr_multiplier_at(step: int, opt: OptimizerConfig, max_steps: int) -> float:
    """The factor on ``opt.lr`` at global ``step`` (0-based): warm-up, then cosine or constant."""
    step = max(0, step)
    if step < opt.warmup_steps:
        return (step + 1) / opt.warmup_steps
    if opt.schedule == "constant":
        return 1.0
    if opt.schedule == "cosine":
        decay_steps = max(1, max_steps - opt.warmup_steps)
        progress = min(1.0, (step - opt.warmup_steps) / decay_steps)
        return opt.min_lr_ratio + (1.0 - opt.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown LR schedule {opt.schedule!r}")


def build_beta_schedule(kl: KLConfig, max_steps: int) -> Callable[[int], float]:
    """``step -> beta`` for the ``kl`` section and a run of ``max_steps`` (``train.max_steps``)."""
    return lambda step: beta_at(step, kl, max_steps)


def build_lr_schedule(opt: OptimizerConfig, max_steps: int) -> Callable[[int], float]:
    """``step -> LR multiplier`` for the ``optimizer`` section and a run of ``max_steps``."""
    return lambda step: lr_multiplier_at(step, opt, max_steps)
