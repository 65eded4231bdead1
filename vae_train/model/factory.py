"""The one place that turns ``model.arch`` into a module, and ``train.trainable`` into frozen parameters.

Every caller that builds a model (the trainer, ``load_model``, the commands, the
benchmarks) calls :func:`build_model`, so none of them switches on the architecture
itself and a new architecture is one entry in :data:`ARCHITECTURES`.
"""

from __future__ import annotations

from typing import Callable, Union

from torch import nn

from vae_train.config import ModelConfig
from vae_train.model.errors import ArchitectureError
from vae_train.model.ldm import AutoencoderKL
from vae_train.model.vae import ConvVAE

VAE = Union[ConvVAE, AutoencoderKL]
"""Any model :func:`build_model` returns (they share ConvVAE's interface)."""

VAE_TYPES: tuple[type[nn.Module], ...] = (ConvVAE, AutoencoderKL)

ARCHITECTURES: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "convvae": ConvVAE, "compact": ConvVAE, "ldm": AutoencoderKL,
}

# Parameter-name prefixes of each trainable part, for both architectures (ConvVAE has no quant convs).
PARTS: dict[str, tuple[str, ...]] = {
    "encoder": ("encoder.", "quant_conv."),
    "decoder": ("decoder.", "post_quant_conv.", "loss_logvar."),  # loss_logvar: the learned output log-variance
}


def build_model(cfg: ModelConfig) -> VAE:
    """The model ``cfg.arch`` names, built from ``cfg`` (random weights; the caller seeds torch)."""
    try:
        build = ARCHITECTURES[cfg.arch]
    except KeyError:
        raise ArchitectureError(f"unknown model.arch={cfg.arch!r}; choose one of {sorted(ARCHITECTURES)}") from None
    return build(cfg)  # type: ignore[return-value]


def part_of(name: str) -> str:
    """``encoder`` or ``decoder``: the part a parameter (by its state-dict name) belongs to."""
    for part, prefixes in PARTS.items():
        if name.startswith(prefixes):
            return part
    raise ArchitectureError(f"parameter {name!r} belongs to neither the encoder nor the decoder; "
                            "train.trainable cannot place it")


def freeze(model: nn.Module, trainable: str) -> list[str]:
    """Apply ``train.trainable`` (all | decoder | encoder): ``requires_grad=False`` on the other part.

    Returns the names of the frozen parameters (empty for ``all``). Frozen parameters then get
    no gradient, and the engine hands only trainable ones to the optimizer and DeepSpeed.
    """
    if trainable == "all":
        return []
    if trainable not in PARTS:
        raise ArchitectureError(f"train.trainable={trainable!r}; choose all, decoder or encoder")
    frozen = []
    for name, param in model.named_parameters():
        if part_of(name) != trainable:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen
