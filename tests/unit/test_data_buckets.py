"""Aspect-ratio buckets in the training stream, and the non-square resize/crop policy, on real photos."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from vae_train.config import ConfigError, DataConfig, load_config
from vae_train.data import DataError, build_train_stream, build_val_stream
from vae_train.data.buckets import auto_buckets, nearest_bucket, resolve_buckets
from vae_train.data.decode import DecodeSpec, cover_size, decode_sample

pytestmark = pytest.mark.timeout(180)

BUCKETS = [[32, 48], [48, 32], [40, 40], [24, 64], [64, 24]]


def _stream(path, *, buckets=BUCKETS, workers: int = 0, batch: int = 4, rank: int = 0, world: int = 1,
            **data_kw):
    data = DataConfig(train=data_kw.pop("train", str(path)), num_workers=workers, shuffle_buffer=8, binarize="none",
                      resize=True, aspect_buckets=buckets, **data_kw)
    return build_train_stream(data, image_size=40, channels=3, value_range=(-1.0, 1.0), micro_batch_size=batch,
                              rank=rank, world_size=world, seed=3, s3_cfg=None, size_multiple=8)


def _take(stream, n: int) -> list[dict]:
    return [next(stream) for _ in range(n)]


# -- shapes ------------------------------------------------------------------------------


def test_auto_buckets_and_nearest() -> None:
    shapes = auto_buckets((256, 256), 8)
    assert (256, 256) in shapes and (360, 184) in shapes and (184, 360) in shapes
    for h, w in shapes:
        assert h % 8 == 0 and w % 8 == 0 and abs(h * w / 256**2 - 1) < 0.1
    ratios = [w / h for h, w in shapes]
    assert ratios == sorted(ratios)
    assert resolve_buckets("auto", (32, 32), 8) == auto_buckets((32, 32), 8)
    assert resolve_buckets([[8, 16]], (32, 32), 8) == ((8, 16),)
    assert resolve_buckets([], (32, 32), 8) == ()
    buckets = [(32, 48), (48, 32), (40, 40)]
    assert nearest_bucket(600, 400, buckets) == 0  # coffee: 3:2 landscape
    assert nearest_bucket(400, 600, buckets) == 1
    assert nearest_bucket(512, 512, buckets) == 2
    assert nearest_bucket(1000, 872, buckets) == 2  # hubble: log-ratio 0.14, nearer 1:1 than 3:2


def test_bucket_config_is_checked() -> None:
    cfg = load_config(None, ["model.channel_mult=[1,2,2,2]", "data.aspect_buckets=[[32,48],[48,32]]"])
    assert cfg.data.aspect_buckets == [(32, 48), (48, 32)]
    with pytest.raises(ConfigError, match=r"\[\[32, 44\]\] are not positive multiples .* factor 8"):
        load_config(None, ["model.channel_mult=[1,2,2,2]", "data.aspect_buckets=[[32,48],[32,44]]"])
    with pytest.raises(ConfigError, match="twice"):
        load_config(None, ["data.aspect_buckets=[[32,48],[32,48]]"])
    assert load_config(None, ["data.aspect_buckets=auto"]).data.aspect_buckets == "auto"


def test_non_square_resize_covers_then_crops(photo_shards) -> None:
    """coffee (600x400) to a 32x48 (H x W) target: scaled to 48x32 (W x H), nothing cropped; to 48x32: scaled to
    cover (72x48), 12 columns cropped each side. The result matches an independent resize + centre crop."""
    from skimage import data

    coffee = data.coffee()
    assert cover_size(600, 400, (32, 48)) == (48, 32) and cover_size(600, 400, (48, 32)) == (72, 48)
    assert cover_size(451, 300, (40, 40)) == (60, 40)
    buffer = io.BytesIO()
    Image.fromarray(coffee).save(buffer, format="PNG")
    members = {"png": buffer.getvalue()}
    for target, cover in (((32, 48), (48, 32)), ((48, 32), (72, 48))):
        spec = DecodeSpec(image_size=target, channels=3, value_range=(0.0, 1.0), resize=True)
        x, _ = decode_sample("coffee", members, spec, None)
        assert x.shape == (3, *target)
        scaled = np.asarray(Image.fromarray(coffee).resize(cover, Image.BICUBIC)).astype(np.float32) / 255
        top, left = (cover[1] - target[0]) // 2, (cover[0] - target[1]) // 2
        expected = scaled[top:top + target[0], left:left + target[1]].transpose(2, 0, 1)
        np.testing.assert_allclose(x, expected, atol=1e-6)
    # without data.resize a photo of another size is refused, with width x height named
    spec = DecodeSpec(image_size=(32, 48), channels=3, value_range=(0.0, 1.0))
    with pytest.raises(Exception, match=r"600x400 image \(width x height\), expected 48x32"):
        decode_sample("coffee", members, spec, None)


# -- the stream --------------------------------------------------------------------------


def test_each_batch_has_one_shape_the_nearest_bucket(photo_shards) -> None:
    stream = _stream(photo_shards.path, workers=2)
    batches = _take(stream, 16)
    seen = Counter()
    for batch in batches:
        shape = tuple(batch["image"].shape[2:])
        assert batch["image"].shape[:2] == (4, 3) and list(shape) in BUCKETS
        assert batch["image"].min() >= -1 and batch["image"].max() <= 1
        for key in batch["key"]:
            width, height = photo_shards.sizes[key]
            assert BUCKETS[nearest_bucket(width, height, [tuple(b) for b in BUCKETS])] == list(shape), key
        seen[shape] += 1
    assert len(seen) >= 4  # landscape, portrait, square, wide and tall photos all came through


@pytest.mark.parametrize("weights", [[], [3.0, 1.0]])
def test_no_sample_is_dropped_or_repeated(photo_shards, weights: list[float]) -> None:
    """The bucketed stream reads exactly the samples of the unbucketed one, in the same order (source mixing
    included): what it emitted plus what its state holds pending is a prefix of the unbucketed stream."""
    train = f"{photo_shards.path}#train + {photo_shards.path}#val" if weights else str(photo_shards.path)
    bucketed = _stream(photo_shards.path, train=train, train_weights=weights)
    emitted = [key for batch in _take(bucketed, 25) for key in batch["key"]]
    pending = [ref[4] for ref in bucketed.state_dict()["workers"][0]["pending"]]
    assert pending, "some bucket should be part-filled"
    plain = build_train_stream(
        DataConfig(train=train, train_weights=weights, num_workers=0, shuffle_buffer=8, binarize="none", resize=True),
        image_size=40, channels=3, value_range=(-1.0, 1.0), micro_batch_size=1, rank=0, world_size=1, seed=3,
        s3_cfg=None)
    read = [next(plain)["key"][0] for _ in range(len(emitted) + len(pending))]
    assert Counter(emitted) + Counter(pending) == Counter(read)


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume(photo_shards, workers: int) -> None:
    """Restoring a state (part-filled buckets included, through JSON) continues with exactly the same batches,
    random crops and flips included."""
    kw = dict(workers=workers, random_crop=True, random_flip=True)
    reference = _take(_stream(photo_shards.path, **kw), 18)
    pending_at_cut = []
    for cut in (1, 7, 12):
        first = _stream(photo_shards.path, **kw)
        _take(first, cut)
        state = json.loads(json.dumps(first.state_dict()))
        pending_at_cut.append(sum(len(w["pending"]) for w in state["workers"] if w))
        first.close()
        resumed = _stream(photo_shards.path, **kw)
        resumed.load_state_dict(state)
        for i, (a, b) in enumerate(zip(reference[cut:], _take(resumed, len(reference) - cut))):
            assert a["key"] == b["key"], (cut, i)
            assert torch.equal(a["image"], b["image"]), (cut, i)
        resumed.close()
    assert max(pending_at_cut) > 0  # the restores had part-filled buckets to read back


def test_resume_refuses_other_buckets_and_changed_data(photo_shards) -> None:
    stream = _stream(photo_shards.path)
    _take(stream, 3)
    state = json.loads(json.dumps(stream.state_dict()))
    other = _stream(photo_shards.path, buckets=BUCKETS[:3])
    with pytest.raises(DataError, match="aspect_buckets"):
        other.load_state_dict(state)
    state["workers"][0]["pending"][0][4] = "not-a-key"  # the shards no longer hold what the state names
    resumed = _stream(photo_shards.path)
    resumed.load_state_dict(state)
    with pytest.raises(DataError, match="pending sample 'not-a-key' .* not in its shard"):
        next(resumed)


def test_every_rank_gets_as_many_batches(photo_shards) -> None:
    """Ranks see different shapes at the same step, but none runs dry: 2 ranks x 2 workers, 20 batches each."""
    shapes = []
    for rank in range(2):
        batches = _take(_stream(photo_shards.path, workers=2, rank=rank, world=2), 20)
        assert len(batches) == 20 and all(len(b["key"]) == 4 for b in batches)
        shapes.append([tuple(b["image"].shape) for b in batches])
    assert shapes[0] != shapes[1]  # independent per-rank streams


def test_validation_stream_decodes_non_square(photo_shards) -> None:
    data = DataConfig(val=str(photo_shards.path), num_workers=0, binarize="none", resize=True)
    stream = build_val_stream(data, image_size=(32, 48), channels=3, value_range=(-1.0, 1.0), batch_size=4, rank=0,
                              world_size=1, s3_cfg=None)
    batches = list(stream)
    assert all(b["image"].shape == (4, 3, 32, 48) for b in batches)
    assert sum(int(b["mask"].sum()) for b in batches) == stream.num_samples > 0
