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
import re
import struct
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
    the caller decides whether to skip or stop. Plain tar streams are parsed by
    :func:`_tar_members` (see there why); compressed ones go through
    :mod:`tarfile` via webdataset.
    """
    from webdataset.gopen import gopen

    s3_opener.register()
    stream = None
    try:
        stream = gopen(url)
        yield from _group(_open_members(stream))
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


# ----------------------------------------------------------------------------- tar reading
#
# Why our own parser: the train stream reads every sample through here, and Python's
# tarfile (header objects, checksums via struct, generic pax handling) plus webdataset's
# layers cost ~60 us of CPU per 28x28 sample: more than decoding its PNG, on cores the
# training ranks need (docs/DESIGN.md "The data path"). Headers are parsed straight from
# the 512-byte blocks instead. What tarfile in stream mode reads (ustar, pax and GNU long
# names) this reads the same way, members are kept and grouped as webdataset's
# ``tar_file_iterator`` + ``group_by_keys`` do, and tests/unit/test_tario.py checks the
# two readers agree; anything rarer (compressed streams) is handed to tarfile itself.

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = frozenset(b"07\0")  # tarfile's regular types; GNU sparse ("S") is refused below
_KNOWN = frozenset(b"0123456\0" b"7" b"LKS")  # tarfile's SUPPORTED_TYPES: others' data is skipped by size
_COMPRESSED_MAGIC = (b"\x1f\x8b\x08", b"BZh91", b"\xfd7zXZ")  # what tarfile's "r|*" detects


class _Prepended(io.RawIOBase):
    """``head`` followed by the rest of ``stream``: hands an already-peeked stream to tarfile."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self._head, self._stream = head, stream

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        if self._head:
            out, self._head = (self._head, b"") if n < 0 or n >= len(self._head) else (self._head[:n], self._head[n:])
            return out
        return self._stream.read(n)


def _read(stream: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes, fewer only at the end of the stream."""
    data = stream.read(n)
    while len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            break
        data += more
    return data


def _open_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular members of the tar stream, in order, with webdataset's meta members left out."""
    from webdataset.tariterators import tar_file_iterator

    head = _read(stream, _BLOCK)
    if head.startswith(_COMPRESSED_MAGIC):
        for member in tar_file_iterator(_Prepended(head, stream)):
            yield member["fname"], member["data"]
        return
    yield from _tar_members(head, stream)


def _octal(field: bytes) -> int:
    """A numeric header field as tarfile's ``nti`` reads it (octal, or GNU base-256)."""
    if field[0] & 0x80:
        return tarfile.nti(field)
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise tarfile.InvalidHeaderError("invalid header") from None


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _checksum_ok(header: bytes) -> bool:
    """tarfile's test: the stored sum matches the unsigned (or, for old writers, signed) sum of the header."""
    stored = _octal(header[148:156])
    unsigned = 256 + sum(header) - sum(header[148:156])
    return stored == unsigned or stored == 256 + sum(struct.unpack_from("148b8x356b", header))


def _pax_records(data: bytes) -> dict[str, str]:
    """The ``length key=value\\n`` records of a pax header (only ``path`` and ``size`` matter here)."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= 0:
            raise tarfile.InvalidHeaderError("invalid pax header")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _tar_members(header: bytes, stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular member, starting from the already-read first ``header``.

    Ends where tarfile's stream mode ends: at a zero block, and -- as tarfile does
    after the first member -- quietly at a short or invalid header; raises
    ``tarfile.ReadError`` where it raises (an empty or non-tar stream, data cut short).
    """
    offset = 0
    long_name: str | None = None
    pax: dict[str, str] = {}
    pax_global: dict[str, str] = {}
    while True:
        extended = long_name is not None or bool(pax)  # this header completes an extended one
        if header == _ZERO_BLOCK and not extended:
            return
        try:
            if len(header) < _BLOCK:
                raise tarfile.ReadError("empty file" if not header else "truncated header")
            if header == _ZERO_BLOCK or not _checksum_ok(header):
                raise tarfile.ReadError("bad checksum")
            size = _octal(header[124:136])
        except (tarfile.ReadError, tarfile.InvalidHeaderError) as exc:
            if offset == 0 or extended:
                raise tarfile.ReadError(str(exc) or "invalid header") from None
            return
        kind = header[156]
        offset += _BLOCK
        if kind in b"xXgLK":  # a header for the next member (pax, GNU long name): read its data, then that member
            data = _read(stream, size + (-size % _BLOCK))
            if len(data) < size + (-size % _BLOCK):
                raise tarfile.ReadError("unexpected end of data")
            data = data[:size]
            if kind == ord("L"):
                long_name = _text(data)
            elif kind in b"xX":
                pax.update(_pax_records(data))
            elif kind == ord("g"):
                pax_global.update(_pax_records(data))
            offset += len(data)
            header = _read(stream, _BLOCK)
            continue
        headers = {**pax_global, **pax}
        if any(key.startswith("GNU.sparse") for key in headers) or kind == ord("S"):
            raise tarfile.ReadError("sparse tar members are not supported")
        if "size" in headers:
            size = int(headers["size"])
        if "path" in headers:
            name = headers["path"]
        elif long_name is not None:
            name = long_name
        else:
            name = _text(header[0:100])
            prefix = _text(header[345:500])
            if prefix:
                name = prefix + "/" + name
        pax, long_name = {}, None
        regular = kind in _REGULAR and not (kind == 0 and name.endswith("/"))
        skip = size if regular or kind not in _KNOWN else 0
        padded = skip + (-skip % _BLOCK)
        data = _read(stream, padded)
        if len(data) < skip:
            raise tarfile.ReadError("unexpected end of data")
        offset += padded
        if regular and not _is_meta(name):
            yield name, data[:size] if padded != size else data
        if len(data) < padded:  # tarfile notices missing padding when it moves on to the next header
            raise tarfile.ReadError("unexpected end of data")
        header = _read(stream, _BLOCK)


def _is_meta(name: str) -> bool:
    """webdataset's members that are not sample data (``__meta__``-style names)."""
    if "/" not in name and name.startswith("__") and name.endswith("__"):
        return True
    return name.startswith("__") and _META.match(name) is not None


_META = re.compile(r"__[^/]*__($|/)")


def _split_name(name: str) -> tuple[str | None, str | None]:
    """(key, extension) as webdataset's ``base_plus_ext`` splits a member name; its regex for rare names."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot > slash + 1 and "\n" not in name:
        return name[:dot], name[dot + 1:]
    from webdataset.tariterators import base_plus_ext

    return base_plus_ext(name)


def _group(members: Iterator[tuple[str, bytes]]) -> Iterator[RawSample]:
    """Consecutive members sharing a key -> one sample, as webdataset's ``group_by_keys`` groups them."""
    key: str | None = None
    sample: dict[str, bytes] = {}
    for name, data in members:
        prefix, ext = _split_name(name)
        if prefix is None:
            continue
        ext = ext.lower()  # type: ignore[union-attr]
        if prefix != key:
            if key is not None:
                yield key, sample
            key, sample = prefix, {}
        if ext in sample:
            raise ValueError(f"{name}: duplicate file name in tar file {ext} {sorted(sample)}")
        sample[ext] = data
    if key is not None:
        yield key, sample


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
