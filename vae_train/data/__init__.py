"""Data: shard writing (``vae-train prepare``) and the streaming pipeline the trainer reads.

Public interface::

    from vae_train.data import build_train_stream, build_val_stream, DataError
    from vae_train.data.prepare import prepare, write_index      # the CLI's engine

Modules: :mod:`.sources` (data.train/val strings -> shard URLs), :mod:`.tario`
(tar read/write), :mod:`.decode` (bytes -> tensors), :mod:`.stream` (train/val
streams, exact resume, stats), :mod:`.s3_opener` (``s3://`` for webdataset),
:mod:`.datasets` and :mod:`.prepare` (writing shards), :mod:`.index` (index.json).

The stream names are imported lazily so that ``vae-train prepare`` does not pay
for importing torch.
"""

from typing import Any

from vae_train.data.errors import DataError

__all__ = ["DataError", "TrainStream", "ValStream", "build_train_stream", "build_val_stream"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from vae_train.data import stream

        return getattr(stream, name)
    raise AttributeError(f"module 'vae_train.data' has no attribute {name!r}")
