"""vae-train: distributed training of convolutional VAEs.

The model library (:mod:`vae_train.model`, :mod:`vae_train.ops`) imports nothing of
the training machinery, so an exported model loads without DeepSpeed.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``vae_train.load_model`` without importing torch on ``import vae_train`` (keeps the CLI fast)."""
    if name == "load_model":
        from vae_train.export import load_model

        return load_model
    raise AttributeError(f"module 'vae_train' has no attribute {name!r}")
