"""``data.cache_mb``: decoded shards replayed from memory give the very batches, counts and states of re-reads."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vae_train.config import DataConfig
from vae_train.data import build_train_stream
from vae_train.data import stream as stream_module
from vae_train.data.prepare import write_index
from vae_train.data.tario import ShardWriter

pytestmark = pytest.mark.timeout(180)


def _stream(data: DataConfig, batch: int, size: int = 28):
    return build_train_stream(data, image_size=size, channels=1, value_range=(0.0, 1.0), micro_batch_size=batch,
                              rank=0, world_size=1, seed=3, s3_cfg=None)


def _shard_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The URLs the stream opens from storage (in-process streams: data.num_workers=0)."""
    opened: list[str] = []
    real = stream_module.iter_shard

    def counting(url: str):
        opened.append(url)
        return real(url)

    monkeypatch.setattr(stream_module, "iter_shard", counting)
    return opened


def _run(data: DataConfig, batches: int, batch: int, size: int = 28) -> tuple[list[dict], dict, dict]:
    stream = _stream(data, batch, size)
    out = [next(stream) for _ in range(batches)]
    state, stats = json.loads(json.dumps(stream.state_dict())), stream.stats()
    stream.close()
    return out, state, stats


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x["key"] == y["key"], f"batch {i}"
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"]), f"batch {i}"


@pytest.mark.parametrize("options", [{}, {"random_flip": True, "classes": [0, 3, 7]}])
def test_cached_stream_matches_the_uncached_one(fashion_shards: Path, monkeypatch: pytest.MonkeyPatch,
                                                options: dict) -> None:
    # 2,700 samples in 500-sample shards: 100 batches of 32 draw every shard about once and some twice.
    data = DataConfig(train=str(fashion_shards), num_workers=0, shuffle_buffer=64, binarize="dynamic", **options)
    reads = _shard_reads(monkeypatch)
    plain, plain_state, plain_stats = _run(data, 100, 32)
    uncached_reads = len(reads)
    reads.clear()
    cached, cached_state, cached_stats = _run(data.model_copy(update={"cache_mb": 64.0}), 100, 32)
    _same(plain, cached)
    assert cached_state == plain_state
    assert cached_stats["filtered"] == plain_stats["filtered"] and cached_stats["skipped"] == plain_stats["skipped"]
    assert len(reads) < uncached_reads  # shards drawn again came from memory
    assert len(reads) == len(set(reads))  # ... every one of them: 64 MB holds this data


def test_resume_into_a_cached_stream_continues_exactly(fashion_shards: Path) -> None:
    data = DataConfig(train=str(fashion_shards), num_workers=0, shuffle_buffer=64, binarize="dynamic")
    reference, _, _ = _run(data, 90, 32)
    cached = data.model_copy(update={"cache_mb": 64.0})
    first = _stream(cached, 32)
    head = [next(first) for _ in range(37)]  # mid-shard and mid-block
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    resumed = _stream(cached, 32)
    resumed.load_state_dict(state)
    _same(reference, head + [next(resumed) for _ in range(53)])


def test_a_budget_too_small_reads_from_storage(fashion_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = DataConfig(train=str(fashion_shards), num_workers=0, shuffle_buffer=64, binarize="dynamic")
    reads = _shard_reads(monkeypatch)
    plain, _, _ = _run(data, 100, 32)
    uncached_reads = len(reads)
    reads.clear()
    tight, _, _ = _run(data.model_copy(update={"cache_mb": 0.1}), 100, 32)  # < one 500-sample shard
    _same(plain, tight)
    assert len(reads) == uncached_reads


def _png(value: int, size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_rejected_samples_are_counted_on_every_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached rejection counts again on each replay, as a re-read would; crops stay random per read."""
    for s in range(2):
        with ShardWriter(tmp_path / f"train-{s:06d}.tar") as writer:
            for i in range(40):
                broken = i == 5
                members = {"png": b"not a png" if broken else _png(s * 100 + i, 12), "cls": str(i % 10).encode()}
                writer.add(f"{s}-{i:04d}", members)
            writer.commit()
    write_index(str(tmp_path))  # scans the shards
    data = DataConfig(train=str(tmp_path), num_workers=0, shuffle_buffer=16, binarize="none", random_crop=True,
                      random_flip=True)
    reads = _shard_reads(monkeypatch)
    plain, plain_state, plain_stats = _run(data, 40, 8, size=8)
    uncached_reads = len(reads)
    reads.clear()
    cached, cached_state, cached_stats = _run(data.model_copy(update={"cache_mb": 1.0}), 40, 8, size=8)
    _same(plain, cached)
    assert cached_state == plain_state
    assert cached_stats["skipped"] == plain_stats["skipped"] and plain_stats["skipped"]["undecodable"] >= 4
    assert len(reads) == 2 < uncached_reads
