"""EMA of the autoencoder's weights: fp32, kept where the weights are, partitioned like them under ZeRO-3.

``ema = EMA(module, decay=0.9999, start_step=0, every_steps=1, partitioned=zero_stage == 3)``
after ``deepspeed.initialize``; ``ema.update(step)`` after each applied optimizer step
(``step`` = steps done); ``with ema.swapped(): ...`` runs code with the EMA weights in
the model (validation, image grids); ``state_dict()`` / ``load_state_dict()`` make it
a checkpoint part.

Each trainable parameter gets an fp32 shadow of the tensor this rank holds: the whole
parameter under ZeRO 0-2 (replicated: every rank holds the same EMA), its ZeRO-3
partition (``param.ds_tensor``, this rank's slice of the flattened, padded parameter)
under ZeRO-3. The EMA of a partition is the partition of the EMA, so nothing is ever
gathered on one rank, and memory follows the weights' (4 bytes per local element).
``swapped()`` copies the shadows into those same local tensors and back, so under
ZeRO-3 the usual gather (``GatheredParameters``) then sees the EMA weights.

The update at step ``s`` (``s >= start_step``, ``(s - start_step) % every_steps == 0``):
the first one copies the weights, later ones do ``ema += (1 - decay) * (w - ema)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def _local(param: nn.Parameter, partitioned: bool) -> torch.Tensor:
    """The tensor this rank holds for ``param``: its ZeRO-3 partition, or the parameter."""
    return param.ds_tensor if partitioned else param.data  # type: ignore[attr-defined]


class EMA:
    """fp32 exponential moving average of a module's trainable parameters (see the module doc)."""

    def __init__(self, module: nn.Module, decay: float, start_step: int = 0, every_steps: int = 1,
                 partitioned: bool = False) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.start_step, self.every_steps = decay, start_step, every_steps
        self.partitioned = partitioned
        self.params = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        self.shadow = {name: _local(p, partitioned).detach().float().clone() for name, p in self.params}
        self.initialized = False  # False until the first update copies the weights

    def due(self, step: int) -> bool:
        """Whether :meth:`update` at ``step`` (optimizer steps done) changes the EMA."""
        return step >= self.start_step and (step - self.start_step) % self.every_steps == 0

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the current weights in (the first due update copies them)."""
        if not self.due(step):
            return
        locals_ = [_local(p, self.partitioned).float() for _, p in self.params]
        shadows = [self.shadow[name] for name, _ in self.params]
        if not self.initialized:
            torch._foreach_copy_(shadows, locals_)
            self.initialized = True
        else:
            torch._foreach_lerp_(shadows, locals_, 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The EMA weights in the model for the duration (a no-op before the first update)."""
        if not self.initialized:
            yield
            return
        saved = []
        with torch.no_grad():
            for name, p in self.params:
                local = _local(p, self.partitioned)
                saved.append(local.clone())
                local.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, p), keep in zip(self.params, saved):
                    _local(p, self.partitioned).copy_(keep)

    def state_dict(self) -> dict[str, Any]:
        """The shadows (this rank's partitions under ZeRO-3) and how to reassemble them."""
        shapes = {name: list(getattr(p, "ds_shape", p.shape)) for name, p in self.params}
        return {"initialized": self.initialized, "partitioned": self.partitioned, "shapes": shapes,
                "decay": self.decay, "tensors": dict(self.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if bool(state["partitioned"]) != self.partitioned or set(state["tensors"]) != set(self.shadow):
            raise ValueError("the saved EMA was made for another parameter layout (ZeRO-3 partitions vs whole "
                             "parameters, or other parameters): resume with the ZeRO stage it was saved with")
        for name, tensor in state["tensors"].items():
            if tensor.shape != self.shadow[name].shape:
                raise ValueError(f"saved EMA of {name} has shape {tuple(tensor.shape)}, this rank holds "
                                 f"{tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(tensor)
        self.initialized = bool(state["initialized"])


def full_weights(states: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The whole EMA weights from every rank's saved state (rank order): one state when not partitioned.

    ZeRO-3 partitions a parameter by flattening it, padding it to a multiple of the
    world size and giving rank r the r-th equal slice; this undoes that.
    """
    first = states[0]
    if not first["partitioned"]:
        return {name: tensor.clone() for name, tensor in first["tensors"].items()}
    full = {}
    for name, shape in first["shapes"].items():
        flat = torch.cat([state["tensors"][name].flatten() for state in states])
        numel = int(torch.Size(shape).numel())
        full[name] = flat[:numel].view(shape).clone()
    return full
