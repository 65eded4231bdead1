"""The shard reader (``tario.iter_shard``) against webdataset's reader, the independent reference.

``iter_shard`` parses tar headers itself for speed; these tests check that on every
kind of tar a shard may be (our writer, webdataset's TarWriter, GNU and pax long
names, ustar prefixes, directories, links, meta members, gzip) it yields exactly what
webdataset's ``tar_file_iterator`` + ``group_by_keys`` yield, and that damage
(truncation, a bad header, duplicate members) ends in the same place with a
:class:`ShardReadError`.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from vae_train.data.tario import ShardReadError, ShardWriter, iter_shard


def _reference(path: Path) -> tuple[list[tuple[str, dict[str, bytes]]], str | None]:
    """webdataset's reading of a shard: (samples, the error that stopped it, if any)."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    samples: list[tuple[str, dict[str, bytes]]] = []
    try:
        with open(path, "rb") as stream:
            for sample in group_by_keys({**m, "__url__": str(path)} for m in tar_file_iterator(stream)):
                key = sample.pop("__key__")
                sample.pop("__url__")
                samples.append((key, sample))
    except Exception as exc:  # noqa: BLE001 - the reference's failure, compared below
        return samples, type(exc).__name__
    return samples, None


def _ours(path: Path) -> tuple[list[tuple[str, dict[str, bytes]]], str | None]:
    samples: list[tuple[str, dict[str, bytes]]] = []
    try:
        for sample in iter_shard(str(path)):
            samples.append(sample)
    except ShardReadError as exc:
        return samples, type(exc.cause).__name__
    return samples, None


def _tar(path: Path, members: list[tuple[str, bytes | None, bytes]], fmt: int) -> Path:
    """A tar of (name, type, data) members written by Python's tarfile in format ``fmt``."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            if kind is not None:
                info.type = kind
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = "x" * 150
            info.size = len(data) if kind in (None, tarfile.REGTYPE) else 0
            tar.addfile(info, io.BytesIO(data) if info.size else None)
    return path


def _mixed_members() -> list[tuple[str, bytes | None, bytes]]:
    long_dir = "d" * 120
    return [
        ("__meta__", None, b"meta"),
        ("0001.png", None, b"\x89PNG" + bytes(700)),
        ("0001.cls", None, b"3"),
        ("0002.PNG", None, b"upper-case extension"),
        ("0002.json", None, b"{}"),
        (f"{long_dir}/0003.png", None, b"a" * 513),  # name over 100 characters: prefix, GNU or pax name
        (f"{long_dir}/0003.cls", None, b"1"),
        ("dir", tarfile.DIRTYPE, b""),
        ("link", tarfile.SYMTYPE, b""),
        ("dir/0004.seg.png", None, b"b" * 512),  # the key ends at the first dot
        ("noextension", None, b"ignored by the grouping"),
        ("0005.tx\u00e9", None, b"utf-8 name"),
        ("0006.png", None, b""),  # an empty member
    ]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_formats_read_as_webdataset_reads_them(tmp_path: Path, fmt: int) -> None:
    members = _mixed_members()
    if fmt == tarfile.USTAR_FORMAT:  # ustar cannot hold a 150-character link name
        members = [m for m in members if m[1] != tarfile.SYMTYPE]
    path = _tar(tmp_path / "shard.tar", members, fmt)
    ours, reference = _ours(path), _reference(path)
    assert ours == reference
    assert len(ours[0]) == 6 and ours[1] is None


def test_shards_of_our_writer_and_webdataset_writer(tmp_path: Path) -> None:
    import webdataset as wds

    with ShardWriter(tmp_path / "ours.tar") as writer:
        for i in range(50):
            writer.add(f"{i:06d}", {"png": bytes([i]) * (i * 37), "cls": str(i % 10).encode()})
        writer.commit()
    with wds.TarWriter(str(tmp_path / "wds.tar")) as sink:
        for i in range(50):
            sink.write({"__key__": f"s/{i:04d}", "png": bytes([i]) * (i * 11), "cls": str(i).encode()})
    for name in ("ours.tar", "wds.tar"):
        ours, reference = _ours(tmp_path / name), _reference(tmp_path / name)
        assert ours == reference
        assert len(ours[0]) == 50 and ours[1] is None


def test_gzip_shards_are_read(tmp_path: Path) -> None:
    plain = _tar(tmp_path / "plain.tar", _mixed_members(), tarfile.PAX_FORMAT)
    packed = tmp_path / "shard.tar.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert _ours(packed) == _reference(packed) == _reference(plain)


SAMPLE_BYTES = 2560
"""One sample of the shards below: png header + 2 data blocks, cls header + 1 data block."""


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated-in-data":
        del data[SAMPLE_BYTES + 600:]
    elif how == "truncated-at-header":
        del data[SAMPLE_BYTES:]  # after the first sample: no end-of-archive blocks
    elif how == "bad-header":
        data[SAMPLE_BYTES + 10] ^= 0xFF  # the second sample's first header
    elif how == "bad-first-header":
        data[10] ^= 0xFF
    elif how == "not-a-tar":
        data[:] = b"this is not a tar file" * 100
    elif how == "empty":
        data[:] = b""
    elif how == "zeros":
        data[:] = bytes(10240)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated-in-data", "truncated-at-header", "bad-header", "bad-first-header",
                                 "not-a-tar", "empty", "zeros"])
def test_damaged_shards_stop_where_webdataset_stops(tmp_path: Path, how: str) -> None:
    with ShardWriter(tmp_path / "shard.tar") as writer:
        for i in range(4):
            writer.add(f"{i:06d}", {"png": bytes([i + 1]) * 700, "cls": b"1"})
        writer.commit()
    _damage(tmp_path / "shard.tar", how)
    ours, reference = _ours(tmp_path / "shard.tar"), _reference(tmp_path / "shard.tar")
    assert ours[0] == reference[0]
    assert (ours[1] is None) == (reference[1] is None), (ours[1], reference[1])
    # what tarfile's stream mode does: an error for data cut short or no tar at all, a quiet end after a
    # short or broken header that follows a complete member
    assert len(ours[0]) == {"truncated-in-data": 1, "truncated-at-header": 1, "bad-header": 1}.get(how, 0)
    assert (ours[1] is not None) == (how in ("truncated-in-data", "bad-first-header", "not-a-tar", "empty"))


def test_duplicate_members_are_an_error_after_the_good_samples(tmp_path: Path) -> None:
    path = _tar(tmp_path / "dup.tar", [("a.png", None, b"1"), ("b.png", None, b"2"), ("b.png", None, b"3")],
                tarfile.PAX_FORMAT)
    ours, reference = _ours(path), _reference(path)
    assert ours[0] == reference[0] == [("a", {"png": b"1"})]
    assert ours[1] == reference[1] == "ValueError"
