"""Bad input: skipped and counted with a warning naming shard and key, or a clear error; never a hang."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vae_train.config import DataConfig, resolve_binarize
from vae_train.data import DataError, build_train_stream, build_val_stream
from vae_train.data.prepare import write_index
from vae_train.data.tario import ShardWriter

pytestmark = pytest.mark.timeout(90)


def _png(value: int, size: int = 28) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _shard(path: Path, prefix: str, n: int, bad: dict[int, dict[str, bytes]] | None = None) -> None:
    with ShardWriter(path) as writer:
        for i in range(n):
            writer.add(f"{prefix}_{i:04d}", (bad or {}).get(i, {"png": _png(i % 256), "cls": b"1"}))
        writer.commit()


@pytest.fixture
def damaged(tmp_path: Path) -> Path:
    """Three train shards (a clean one, one with an undecodable, a wrong-size and a colour sample, a truncated one)
    and one truncated val shard next to a clean one, with an index.json."""
    _shard(tmp_path / "train-000000.tar", "a", 40)
    colour = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(colour, "PNG")
    _shard(tmp_path / "train-000001.tar", "b", 40,
           {3: {"png": b"\x89PNG broken"}, 5: {"png": _png(0, 20)}, 7: {"png": colour.getvalue()}})
    _shard(tmp_path / "train-000002.tar", "c", 40)
    _shard(tmp_path / "val-000000.tar", "v", 30, {2: {"png": b"not an image"}})
    _shard(tmp_path / "val-000001.tar", "w", 30)
    write_index(str(tmp_path))  # counts before the damage, as a reader would find them
    for name in ("train-000002.tar", "val-000001.tar"):
        path = tmp_path / name
        path.write_bytes(path.read_bytes()[:5000])  # truncated mid-member
    return tmp_path


def _bernoulli(data: DataConfig) -> DataConfig:
    """These DataConfigs stand alone: resolve binarize=auto as a Config with the Bernoulli likelihood does."""
    return data.model_copy(update={"binarize": resolve_binarize(data.binarize, "bernoulli")})


def _train(data: DataConfig, batch: int = 8, seed: int = 0):
    return build_train_stream(_bernoulli(data), image_size=28, channels=1, value_range=(0.0, 1.0),
                              micro_batch_size=batch, rank=0, world_size=1, seed=seed, s3_cfg=None)


def _val(data: DataConfig, rank: int = 0, world_size: int = 1, batch: int = 16):
    return build_val_stream(_bernoulli(data), image_size=28, channels=1, value_range=(0.0, 1.0), batch_size=batch,
                            rank=rank, world_size=world_size, s3_cfg=None)


def test_damaged_training_data_is_skipped_counted_and_named(damaged: Path, data_log) -> None:
    stream = _train(DataConfig(train=str(damaged), num_workers=0, shuffle_buffer=10))
    keys = [k for _ in range(60) for k in next(stream)["key"]]
    assert not {"b_0003", "b_0005", "b_0007"} & set(keys) and any(k.startswith("c_") for k in keys)
    skipped = stream.stats()["skipped"]
    assert skipped["undecodable"] >= 1 and skipped["size"] >= 1 and skipped["mode"] >= 1
    assert skipped["shard_error"] >= 1
    text = data_log.text
    assert "'b_0003'" in text and "train-000001.tar" in text  # warnings name key and shard
    assert "train-000002.tar" in text


def test_a_damaged_shard_is_warned_once_per_reason_then_only_counted(damaged: Path, data_log) -> None:
    """One shard, drawn again and again: each (shard, reason) is one warning, every skip is counted."""
    stream = _train(DataConfig(train=f"{damaged}/train-000001.tar", num_workers=0, shuffle_buffer=10))
    for _ in range(40):  # 320 samples: the 37-good-sample shard is read about 9 times
        next(stream)
    skipped = stream.stats()["skipped"]
    assert skipped["undecodable"] >= 5 and skipped["size"] >= 5 and skipped["mode"] >= 5
    # data_log may see a record twice (its handler and caplog's root handler): count distinct records
    records = {id(r): r for r in data_log.records}.values()
    warnings = [r.getMessage() for r in records if r.levelname == "WARNING"]
    for key, reason in (("b_0003", "undecodable"), ("b_0005", "size"), ("b_0007", "mode")):
        about = [w for w in warnings if f"'{reason}' problems" in w]
        assert len(about) == 1 and key in about[0] and "train-000001.tar" in about[0], warnings
    assert len(warnings) == 3, warnings


def test_damaged_data_with_workers_still_counts(damaged: Path) -> None:
    stream = _train(DataConfig(train=str(damaged), num_workers=2, shuffle_buffer=10))
    for _ in range(60):
        next(stream)
    assert stream.stats()["skipped_total"] >= 3
    stream.close()


def test_strict_turns_damage_into_an_error(damaged: Path) -> None:
    stream = _train(DataConfig(train=f"{damaged}/train-000001.tar", num_workers=1, strict=True))
    with pytest.raises(DataError, match=r"b_0003.*data.strict"):
        for _ in range(20):
            next(stream)


def test_damaged_validation_is_masked_and_counted_never_dropped(damaged: Path) -> None:
    data = DataConfig(val=str(damaged), num_workers=2)
    masks, keys, lengths = 0, [], []
    for rank in (0, 1):
        stream = _val(data, rank=rank, world_size=2)
        batches = list(stream)
        lengths.append(len(batches))
        masks += sum(int(b["mask"].sum()) for b in batches)
        keys += [k for b in batches for k, m in zip(b["key"], b["mask"]) if m]
        assert all(b["image"].shape[0] == 16 for b in batches)
        if rank == 1:  # rank 1 owns samples 30..59: the truncated shard
            assert stream.stats()["skipped"]["missing"] > 0
        else:
            assert stream.stats()["skipped"] == {"undecodable": 1}
    assert lengths[0] == lengths[1]
    assert len(keys) == len(set(keys)) == masks
    assert {f"v_{i:04d}" for i in range(30) if i != 2} <= set(keys)


def test_all_shards_unreadable_is_an_error_not_a_hang(tmp_path: Path) -> None:
    for k in range(3):
        (tmp_path / f"train-{k:06d}.tar").write_bytes(b"this is not a tar file" * 100)
    start = time.monotonic()
    stream = _train(DataConfig(train=f"{tmp_path}/train-{{000000..000002}}.tar", num_workers=1))
    with pytest.raises(DataError, match="shards in a row gave no samples"):
        next(stream)
    assert time.monotonic() - start < 30


def test_every_sample_rejected_is_an_error(tmp_path: Path) -> None:
    _shard(tmp_path / "train-000000.tar", "s", 300, {i: {"png": _png(1, 16)} for i in range(300)})
    stream = _train(DataConfig(train=f"{tmp_path}/train-000000.tar", num_workers=0))
    with pytest.raises(DataError, match="rejected.*model.image_size"):
        next(stream)


def test_every_sample_rejected_in_buckets_is_an_error(tmp_path: Path) -> None:
    """The bucketed loop counts the same rejections in a row (headers readable, sizes that fit no bucket)."""
    _shard(tmp_path / "train-000000.tar", "s", 300, {i: {"png": _png(1, 16)} for i in range(300)})
    stream = _train(DataConfig(train=f"{tmp_path}/train-000000.tar", num_workers=0, aspect_buckets=[[28, 28]]))
    with pytest.raises(DataError, match="256 samples in a row were rejected.*data.aspect_buckets"):
        next(stream)


def test_shard_deleted_after_start_is_skipped(tmp_path: Path) -> None:
    _shard(tmp_path / "train-000000.tar", "a", 20)
    _shard(tmp_path / "train-000001.tar", "b", 20)
    stream = _train(DataConfig(train=f"{tmp_path}/train-{{000000..000001}}.tar", num_workers=0))
    (tmp_path / "train-000001.tar").unlink()
    keys = [k for _ in range(20) for k in next(stream)["key"]]
    assert all(k.startswith("a_") for k in keys)
    assert stream.stats()["skipped"]["shard_error"] >= 1


def test_stuck_source_times_out(tmp_path: Path) -> None:
    stream = _train(DataConfig(train="pipe:sleep 60", num_workers=1, timeout_s=2))
    start = time.monotonic()
    with pytest.raises(DataError, match="data.timeout_s"):
        next(stream)
    assert time.monotonic() - start < 20
    stream.close()


@pytest.mark.parametrize("spec, message", [
    ("", "no data source"),
    ("{tmp}/nowhere", "does not exist"),
    ("{tmp}", "no index.json"),
    ("{tmp}/train-{{000000..000003}}.tar", "do not exist"),
    ("{tmp}/shards#nosuchsplit", "available splits"),
    ("{tmp}/badindex", "not a valid shard index"),
])
def test_missing_or_wrong_sources_fail_at_start_up(tmp_path: Path, spec: str, message: str) -> None:
    (tmp_path / "shards").mkdir()
    _shard(tmp_path / "shards" / "train-000000.tar", "a", 3)
    write_index(str(tmp_path / "shards"))
    (tmp_path / "badindex").mkdir()
    (tmp_path / "badindex" / "index.json").write_text("{not json")
    with pytest.raises(DataError, match=message):
        _train(DataConfig(train=spec.format(tmp=tmp_path), num_workers=0))


def test_validation_needs_counts(tmp_path: Path) -> None:
    _shard(tmp_path / "val-000000.tar", "v", 3)
    with pytest.raises(DataError, match="index.json"):
        _val(DataConfig(val=f"{tmp_path}/val-000000.tar"))


def test_weights_must_match_sources(tmp_path: Path) -> None:
    _shard(tmp_path / "train-000000.tar", "a", 3)
    with pytest.raises(DataError, match="one weight per source"):
        _train(DataConfig(train=f"{tmp_path}/train-000000.tar", train_weights=[1.0, 2.0]))


def test_fewer_shards_than_ranks_times_workers(tmp_path: Path) -> None:
    _shard(tmp_path / "train-000000.tar", "a", 50)
    write_index(str(tmp_path))
    data = DataConfig(train=str(tmp_path), num_workers=2, shuffle_buffer=10)
    streams = [build_train_stream(_bernoulli(data), image_size=28, channels=1, value_range=(0.0, 1.0), micro_batch_size=8,
                                  rank=r, world_size=2, seed=0, s3_cfg=None) for r in (0, 1)]
    for stream in streams:  # one shard feeds 2 ranks x 2 workers: every reader still gets batches
        assert all(len(next(stream)["key"]) == 8 for _ in range(10))
        stream.close()
