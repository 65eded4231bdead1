"""Turn ``data.train`` / ``data.val`` strings into lists of shard URLs, checked at start-up.

Accepted forms (several joined by ``' + '``, mixed by ``data.train_weights``)::

    data/fmnist                    directory with index.json: its train split (val split for data.val)
    data/fmnist#test               another split of that index
    data/train-{000000..000009}.tar   brace pattern of local shards
    pipe:curl -s http://host/train-{0000..0099}.tar   a command writing one shard to stdout (braces expanded)
    s3://bucket/prefix[#split]     S3 prefix with index.json (read through boto3)
    s3://bucket/p/train-{000000..000099}.tar          S3 brace pattern
    https://host/data/[index.json][#split]            index over http(s); or a brace pattern / .tar URL

Failures a user can fix before training (a missing directory, index or local
shard, an unreachable endpoint, wrong credentials) are raised here as
:class:`DataError` with the fix, so a job never starts to die in a worker later.
Shard-level trouble that can only show while reading (a shard deleted mid-run, a
truncated archive) is left to the stream, which skips and counts it.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import braceexpand

from vae_train.data.errors import DataError
from vae_train.data.index import INDEX_NAME, ShardIndex

if TYPE_CHECKING:
    from vae_train.config import S3Config

SOURCE_SEPARATOR = " + "


@dataclass(frozen=True)
class Shard:
    """One shard URL, its sample count and its images' aspect-ratio histogram (None when no index told us)."""

    url: str
    num_samples: int | None
    aspect_ratios: tuple[tuple[str, int], ...] | None = None  # index.json's {ratio key: images}, as pairs


@dataclass(frozen=True)
class Source:
    """One source: what the user wrote, its shards in order, and its mixing weight."""

    spec: str
    shards: tuple[Shard, ...]
    weight: float = 1.0

    @property
    def num_samples(self) -> int | None:
        """Total samples, or None when any shard's count is unknown."""
        counts = [shard.num_samples for shard in self.shards]
        return None if any(c is None for c in counts) else sum(counts)  # type: ignore[misc]


def aspect_ratios(sources: list[Source]) -> Counter[str] | None:
    """The images' aspect-ratio histogram over all ``sources``; None when any shard's is unknown."""
    shards = [shard for source in sources for shard in source.shards]
    if any(shard.aspect_ratios is None for shard in shards):
        return None
    total: Counter[str] = Counter()
    for shard in shards:
        total.update(dict(shard.aspect_ratios))  # type: ignore[arg-type]
    return total


def fingerprint(sources: list[Source]) -> str:
    """A short hash of every shard URL and count: a resumed stream must read the same data."""
    text = json.dumps([[s.spec, s.weight, [(x.url, x.num_samples) for x in s.shards]] for s in sources])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resolve_sources(
    spec: str, *, default_split: str, weights: list[float] | None = None, s3_cfg: "S3Config | None" = None
) -> list[Source]:
    """Parse ``spec`` (``' + '``-separated) into checked sources with weights.

    ``default_split`` is the index split used when a part names none (``train``
    for ``data.train``, ``val`` for ``data.val``).
    """
    parts = [part.strip() for part in spec.split(SOURCE_SEPARATOR) if part.strip()]
    if not parts:
        raise DataError("no data source given: set data.train (and data.val) to a directory made by "
                        "`vae-train prepare`, a brace pattern of .tar shards, pipe:..., or s3://bucket/prefix")
    weights = list(weights or [])
    if weights and len(weights) != len(parts):
        raise DataError(f"data.train_weights has {len(weights)} entries but data.train names {len(parts)} "
                        f"source(s) ({spec!r}); give one weight per source or none")
    if any(w <= 0 for w in weights):
        raise DataError(f"data.train_weights must all be positive, got {weights}")
    return [Source(part, tuple(_resolve_one(part, default_split, s3_cfg)), weights[i] if weights else 1.0)
            for i, part in enumerate(parts)]


def _split_name(part: str, default_split: str) -> tuple[str, str]:
    """``base#split`` -> (base, split); a ``#`` inside a pipe: command is left alone."""
    base, sep, split = part.rpartition("#")
    if not sep or part.startswith("pipe:") or "/" in split or not split:
        return part, default_split
    return base, split


def split_name(part: str, default_split: str) -> str:
    """The index split one source part reads: its ``#split``, else ``default_split``."""
    return _split_name(part, default_split)[1]


def _expand(pattern: str) -> list[str]:
    return list(braceexpand.braceexpand(pattern))


def _resolve_one(part: str, default_split: str, s3_cfg: "S3Config | None") -> list[Shard]:
    if part.startswith("pipe:"):
        return [Shard(url, None) for url in _expand(part)]
    base, split = _split_name(part, default_split)
    if base.startswith("s3://"):
        return _resolve_s3(base, split, s3_cfg)
    if base.startswith(("http://", "https://")):
        return _resolve_http(base, split)
    return _resolve_local(base.removeprefix("file://"), split)


def _is_pattern(path: str) -> bool:
    return "{" in path or path.endswith(".tar")


def _from_index(index: ShardIndex, split: str, join) -> list[Shard]:
    shards = [Shard(join(record.name), record.num_samples,
                    None if record.aspect_ratios is None else tuple(sorted(record.aspect_ratios.items())))
              for record in index.shards(split)]
    if not shards:
        raise DataError(f"split {split!r} of the index has no shards; re-run `vae-train prepare`")
    return shards


def _resolve_local(base: str, split: str) -> list[Shard]:
    if _is_pattern(base):
        urls = _expand(base)
        missing = [u for u in urls if not os.path.isfile(u)]
        if missing:
            raise DataError(f"{len(missing)} of {len(urls)} shard(s) of {base!r} do not exist "
                            f"(first: {missing[0]}); check the path and the brace range")
        return [Shard(url, None) for url in urls]
    if not os.path.isdir(base):
        raise DataError(f"data source {base!r} does not exist; make shards with `vae-train prepare ... --out {base}`")
    index_path = os.path.join(base, INDEX_NAME)
    if not os.path.isfile(index_path):
        raise DataError(f"{base!r} has no {INDEX_NAME}; write one with `vae-train prepare index {base}` "
                        "or give the shards as a brace pattern (dir/train-{000000..000009}.tar)")
    with open(index_path, "rb") as f:
        index = ShardIndex.from_json(f.read(), index_path)
    shards = _from_index(index, split, lambda name: os.path.join(base, name))
    missing = [s.url for s in shards if not os.path.isfile(s.url)]
    if missing:
        raise DataError(f"{len(missing)} shard(s) listed in {index_path} are missing (first: {missing[0]}); "
                        "re-run `vae-train prepare` with the same options to resume")
    return shards


def _resolve_s3(base: str, split: str, s3_cfg: "S3Config | None") -> list[Shard]:
    from vae_train.data import s3_opener
    from vae_train.storage import StorageError, open_store

    s3_opener.configure(s3_cfg)
    if _is_pattern(base):
        urls = _expand(base)
        prefix, _, first_key = urls[0].rpartition("/")
        store = open_store(prefix, s3_cfg)
        try:
            store.check_access(write=False)
            found = store.head(first_key)
        except StorageError as exc:
            raise DataError(f"cannot read {base!r}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - botocore errors carry no user-facing type
            raise DataError(f"cannot read {urls[0]!r}: {type(exc).__name__}: {exc}") from None
        if found is None:
            raise DataError(f"shard {urls[0]!r} does not exist; check the bucket, prefix and brace range")
        return [Shard(url, None) for url in urls]
    prefix = base.rstrip("/")
    store = open_store(prefix, s3_cfg)
    try:
        store.check_access(write=False)
        if store.head(INDEX_NAME) is None:
            raise DataError(f"{prefix}/ has no {INDEX_NAME}; write shards there with `vae-train prepare ... "
                            f"--out {prefix}` or give a brace pattern ({prefix}/train-{{000000..000009}}.tar)")
        index = ShardIndex.from_json(store.get_bytes(INDEX_NAME), f"{prefix}/{INDEX_NAME}")
    except StorageError as exc:
        raise DataError(f"cannot read {prefix}: {exc}") from None
    return _from_index(index, split, lambda name: f"{prefix}/{name}")


def _resolve_http(base: str, split: str) -> list[Shard]:
    if _is_pattern(base):
        return [Shard(url, None) for url in _expand(base)]
    index_url = base if base.endswith(".json") else base.rstrip("/") + "/" + INDEX_NAME
    try:
        with urllib.request.urlopen(index_url, timeout=30) as response:  # noqa: S310 - user-given http(s) URL
            text = response.read()
    except OSError as exc:
        raise DataError(f"cannot fetch {index_url}: {exc}; check the URL or give a brace pattern of .tar URLs") from None
    index = ShardIndex.from_json(text, index_url)
    root = index_url.rpartition("/")[0]
    return _from_index(index, split, lambda name: f"{root}/{name}")
