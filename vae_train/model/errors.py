"""Errors the model raises for input it cannot handle.

They subclass :class:`~vae_train.errors.VaeTrainError`, so the CLI prints the
message (cause and fix) instead of a traceback from inside a convolution.
"""

from vae_train.errors import VaeTrainError


class ModelError(VaeTrainError):
    """Base of the model's user-facing errors."""


class ArchitectureError(ModelError):
    """The configured architecture cannot process the configured image size."""


class InputShapeError(ModelError):
    """A batch whose rank, channels or size does not match the model."""


class DataRangeError(ModelError):
    """Pixel values outside the range the likelihood is defined on."""
