"""Tar shards: writing one deterministically and atomically, reading one as raw samples.

A sample is a group of tar members sharing a key (``000123.png``, ``000123.cls``),
the WebDataset convention, so shards made here read in any WebDataset tool and
shards made elsewhere read here.

Writing is deterministic (fixed member order, mtime 0, no user names), so the same
input gives byte-identical shards and hashes: a job-array prepare can be checked
against a single-process one. It is atomic: bytes go to a hidden temporary file in
the same directory, which is fsynced and renamed only when complete, so a killed
prepare never leaves a truncated shard under a final name.

Reading goes through :func:`webdataset.gopen.gopen` (local files, ``pipe:``,
``http(s)`` via curl, and ``s3://`` via :mod:`vae_train.data.s3_opener`).
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from vae_train.data import s3_opener
from vae_train.data.buckets import AspectCounter
from vae_train.data.index import ShardRecord

RawSample = tuple[str, dict[str, bytes]]
"""A sample as stored: its key and its members by extension (``{"png": b"...", "cls": b"3"}``)."""

PARTIAL_SUFFIX = ".partial"


class ShardReadError(Exception):
    """A shard could not be opened or read to its end (missing, truncated, corrupt, unreachable)."""

    def __init__(self, url: str, cause: BaseException) -> None:
        super().__init__(f"{url}: {type(cause).__name__}: {cause}")
        self.url = url
        self.cause = cause


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes and counts every byte on its way to the real file."""

    def __init__(self, target: BinaryIO) -> None:
        self._target = target
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        self._target.write(data)
        self.sha256.update(data)
        self.bytes += len(data)
        return len(data)


def _member(name: str, size: int) -> tarfile.TarInfo:
    """A tar header with every varying field fixed, so shards are reproducible."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def partial_path(final: Path) -> Path:
    """The hidden temporary name a shard is written under before its rename."""
    return final.with_name(f".{final.name}.{os.getpid()}{PARTIAL_SUFFIX}")


class ShardWriter:
    """Write one shard: ``add()`` samples, then ``commit()`` (rename) or ``abort()`` (delete).

    Used as a context manager, an exception inside the block aborts, so no partial
    file survives under the final name (nor, normally, under the temporary one).
    """

    def __init__(self, path: str | Path, record_name: str | None = None) -> None:
        self.path = Path(path)
        self._record_name = record_name or self.path.name
        self._tmp = partial_path(self.path)
        self._file = open(self._tmp, "wb")
        self._hasher = _HashingWriter(self._file)
        self._tar = tarfile.open(fileobj=self._hasher, mode="w|", format=tarfile.PAX_FORMAT)
        self._aspects = AspectCounter()
        self.num_samples = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample; members are written in sorted extension order."""
        if "." in key.rsplit("/", 1)[-1]:
            raise ValueError(f"sample key {key!r} contains a '.', which WebDataset readers split on")
        for ext in sorted(members):
            data = members[ext]
            self._tar.addfile(_member(f"{key}.{ext}", len(data)), io.BytesIO(data))
        self._aspects.add(members)
        self.num_samples += 1

    def commit(self) -> ShardRecord:
        """Finish the archive, fsync, rename to the final name; returns the shard's record."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        return ShardRecord(self._record_name, self.num_samples, self._hasher.bytes, self._hasher.sha256.hexdigest(),
                           self._aspects.histogram())

    def abort(self) -> None:
        """Drop the temporary file."""
        try:
            self._tar.close()  # flush tarfile's buffer now, not into a closed file at garbage collection
        except Exception:  # noqa: BLE001 - the file is deleted anyway
            pass
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def iter_shard(url: str) -> Iterator[RawSample]:
    """Yield the raw samples of one shard in stored order.

    Every failure (open, network, truncated or corrupt archive, duplicate member)
    becomes :class:`ShardReadError` after the samples read so far were yielded:
    the caller decides whether to skip or stop.
    """
    from webdataset.gopen import gopen
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    s3_opener.register()
    stream = None
    try:
        stream = gopen(url)
        files = ({**member, "__url__": url} for member in tar_file_iterator(stream))
        for sample in group_by_keys(files):
            key = sample.pop("__key__")
            sample.pop("__url__", None)
            yield key, sample
    except GeneratorExit:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the source is a shard-level error
        raise ShardReadError(url, exc) from exc
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - a pipe closed early reports a status; data was already read
                pass


def scan_shard(path: str | Path) -> ShardRecord:
    """Count, size, hash and measure (aspect ratios) an existing local shard: the record its writer returned.

    For resuming prepare and for indexing shards made elsewhere.
    """
    path = Path(path)
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    aspects, count = AspectCounter(), 0
    for _key, members in iter_shard(str(path)):
        aspects.add(members)
        count += 1
    return ShardRecord(path.name, count, path.stat().st_size, sha.hexdigest(), aspects.histogram())
