"""The data pipeline's user-facing error type."""

from vae_train.errors import VaeTrainError


class DataError(VaeTrainError):
    """Shards, sources or samples that cannot be used: the message names the cause and the fix."""
