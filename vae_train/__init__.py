"""vae-train: distributed training of convolutional VAEs.

The model library (:mod:`vae_train.model`, :mod:`vae_train.ops`) imports nothing of
the training machinery, so an exported model loads without DeepSpeed.
"""

__version__ = "0.1.0"
