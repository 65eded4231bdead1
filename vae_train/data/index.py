"""``index.json``: which shards a split has, how many samples each holds, and their hashes.

Readers split validation data across ranks (and weight shard draws by their sample
counts) from this file alone, without opening a shard; training itself needs no index. The file is written by ``vae-train prepare`` (or by
``vae-train prepare index DIR`` for existing shards and for job-array slices) and
is deterministic: the same shards give byte-identical JSON, so a sliced prepare and
a single-process prepare produce the same file.

Layout::

    {"format": "vae-train-shards/1",
     "meta": {...how the shards were made...},
     "splits": {"train": {"num_samples": 54000,
                          "shards": [{"name": "train-000000.tar", "num_samples": 5000,
                                      "bytes": 10240000, "sha256": "...",
                                      "aspect_ratios": {"1.5": 3100, "0.6667": 1900}}, ...]},
                "val": {...}, "test": {...}}}

Shard names are relative to the directory (or S3 prefix, or URL) holding index.json.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from vae_train.data.errors import DataError

INDEX_NAME = "index.json"
INDEX_FORMAT = "vae-train-shards/1"


@dataclass(frozen=True)
class ShardRecord:
    """One written shard: its name relative to the index, sample count, size and content hash.

    ``aspect_ratios`` counts the shard's images by width / height (see
    :func:`vae_train.data.buckets.ratio_key`), read from their headers when the shard
    was written or scanned, so ``data.aspect_buckets: auto`` can keep the shapes the
    data uses without opening a shard. None: not recorded (shards of something other
    than images, or an index written before the field existed).
    """

    name: str
    num_samples: int
    bytes: int
    sha256: str
    aspect_ratios: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record as index.json stores it (``aspect_ratios`` left out when unknown)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class ShardIndex:
    """The parsed ``index.json``: split name -> ordered shard records, plus free-form metadata."""

    splits: dict[str, list[ShardRecord]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def num_samples(self, split: str) -> int:
        """Samples in ``split`` (the sum over its shards)."""
        return sum(shard.num_samples for shard in self.shards(split))

    def shards(self, split: str) -> list[ShardRecord]:
        """The shards of ``split``; a clear error naming the available splits when absent."""
        if split not in self.splits:
            available = ", ".join(sorted(self.splits)) or "none"
            raise DataError(f"split {split!r} is not in the index (available splits: {available}); "
                            "name another one with DIR#split")
        return self.splits[split]

    def to_json(self) -> str:
        """Deterministic JSON (sorted splits and meta keys, shards in order)."""
        payload = {
            "format": INDEX_FORMAT,
            "meta": self.meta,
            "splits": {
                split: {"num_samples": self.num_samples(split), "shards": [s.to_dict() for s in shards]}
                for split, shards in sorted(self.splits.items())
            },
        }
        return json.dumps(payload, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> "ShardIndex":
        """Parse and check an index; ``where`` names the file in error messages."""
        try:
            payload = json.loads(text)
            if payload.get("format") != INDEX_FORMAT:
                raise ValueError(f"format is {payload.get('format')!r}, expected {INDEX_FORMAT!r}")
            splits = {
                split: [ShardRecord(**shard) for shard in body["shards"]]
                for split, body in payload["splits"].items()
            }
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{where} is not a valid shard index ({exc}); rewrite it with "
                            "`vae-train prepare index DIR`") from None
        return cls(splits=splits, meta=payload.get("meta", {}))
