"""``data.aspect_buckets: auto`` derived from the data: index.json's aspect-ratio histograms and the shapes kept.

The oracle for what the shards hold is the fixture's own record of every image's
size (numpy array shapes, taken before any PNG was written), not the code under test.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from vae_train.config import DataConfig
from vae_train.data import build_train_stream
from vae_train.data.buckets import AspectCounter, auto_buckets, nearest_bucket, ratio_key
from vae_train.data.datasets import encode_png
from vae_train.data.index import ShardIndex
from vae_train.data.prepare import write_index
from vae_train.data.tario import ShardWriter, scan_shard

pytestmark = pytest.mark.timeout(180)

AREA_HW, MULTIPLE = (96, 96), 8  # nine distinct auto shapes (a smaller area merges some)


def _auto_stream(train: str, *, rank: int = 0, world: int = 1, batch: int = 4):
    data = DataConfig(train=train, num_workers=0, shuffle_buffer=8, binarize="none", resize=True,
                      aspect_buckets="auto")
    return build_train_stream(data, image_size=AREA_HW, channels=3, value_range=(-1.0, 1.0), micro_batch_size=batch,
                              rank=rank, world_size=world, seed=3, s3_cfg=None, size_multiple=MULTIPLE)


def _buckets(stream) -> list[tuple[int, int]]:
    return [tuple(b) for b in stream.state_dict()["aspect_buckets"]]


def test_index_records_each_shards_aspect_ratios(photo_shards) -> None:
    """prepare's index counts every image of every shard by its ratio, as the images were made; a rescan agrees."""
    index = ShardIndex.from_json((photo_shards.path / "index.json").read_text(), "index.json")
    total: Counter[str] = Counter()
    for split in ("train", "val"):
        for record in index.shards(split):
            assert record.aspect_ratios is not None and sum(record.aspect_ratios.values()) == record.num_samples
            assert scan_shard(photo_shards.path / record.name) == record  # resume / `prepare index` give the same
            total.update(record.aspect_ratios)
    assert total == Counter(ratio_key(w, h) for w, h in photo_shards.sizes.values())
    assert {"1.5", "0.6667", "1"} <= set(total)  # coffee 600x400 landscape and portrait, astronaut square


def test_auto_keeps_only_the_shapes_the_data_maps_to(photo_shards) -> None:
    """Of the nine auto shapes, exactly those some photo is nearest to are kept (the same on every rank), and
    every one of them fills batches."""
    train = f"{photo_shards.path}#train + {photo_shards.path}#val"
    shapes = auto_buckets(AREA_HW, MULTIPLE)
    used = {shapes[nearest_bucket(w, h, shapes)] for w, h in photo_shards.sizes.values()}
    expected = [shape for shape in shapes if shape in used]
    assert len(shapes) == 9 and 1 < len(expected) < len(shapes)  # the photos leave some auto shapes empty: the test can fail
    streams = [_auto_stream(train, rank=rank, world=2) for rank in range(2)]
    assert [_buckets(s) for s in streams] == [expected, expected]
    seen = Counter(tuple(next(streams[0])["image"].shape[2:]) for _ in range(24))
    assert set(seen) == set(expected), seen


def test_auto_without_histograms_uses_every_shape_then_prepare_index_adds_them(tmp_path: Path, data_log) -> None:
    """Hand-made shards (square and 2:1 images, no index): auto falls back to all nine shapes with a note;
    `vae-train prepare index` writes the histograms, and auto then keeps the square and the 2:1 shape only."""
    rng = np.random.default_rng(0)
    sizes = [(24, 24)] * 9 + [(20, 40)] * 5 + [(9, 20)] * 2  # (H, W): 1:1, 2:1, 2.22:1 (nearest 2:1 as well)
    with ShardWriter(tmp_path / "train-000000.tar") as writer:
        for i, (h, w) in enumerate(sizes):
            writer.add(f"s{i:03d}", {"png": encode_png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))})
        record = writer.commit()
    assert record.aspect_ratios == {"1": 9, "2": 5, "2.222": 2}
    shapes = auto_buckets(AREA_HW, MULTIPLE)
    assert len(shapes) == 9

    assert _buckets(_auto_stream(str(tmp_path / "train-{000000..000000}.tar"))) == list(shapes)
    assert "records no image aspect ratios" in data_log.text and "prepare index" in data_log.text

    write_index(str(tmp_path))
    data_log.clear()
    kept = _buckets(_auto_stream(str(tmp_path)))
    assert kept == [shapes[nearest_bucket(1, 1, shapes)], shapes[nearest_bucket(2, 1, shapes)]] == [(96, 96), (64, 136)]
    assert "2 of 9 shapes hold the data's images (96x96: 9, 64x136: 7)" in data_log.text

    # an index written before the histograms existed reads as "no sizes recorded": all shapes again
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(tmp_path / "train-000000.tar", old)
    payload = json.loads((tmp_path / "index.json").read_text())
    for shard in payload["splits"]["train"]["shards"]:
        del shard["aspect_ratios"]
    (old / "index.json").write_text(json.dumps(payload))
    assert _buckets(_auto_stream(str(old))) == list(shapes)


def test_only_image_shards_get_a_histogram() -> None:
    """Latent shards (safetensors members) have none; an unreadable image header is left out of the counts."""
    latents = AspectCounter()
    latents.add({"safetensors": b"\x00" * 16})
    assert latents.histogram() is None
    images = AspectCounter()
    images.add({"png": encode_png(np.zeros((10, 30), np.uint8)), "cls": b"1"})
    images.add({"png": b"not a png"})
    assert images.histogram() == {"3": 1}
