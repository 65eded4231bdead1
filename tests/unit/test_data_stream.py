"""The training and validation streams: exact resume, rank/worker splitting, decoding policy."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures.trained_vae import read_fashion_mnist
from vae_train.config import DataConfig, resolve_binarize
from vae_train.data import DataError, build_train_stream, build_val_stream
from vae_train.data.decode import DecodeSpec, Prepared, SampleRejected, decode_sample, finish_batch, finish_sample

pytestmark = pytest.mark.timeout(180)


def _resolved(data: DataConfig, value_range) -> DataConfig:
    """These DataConfigs stand alone: resolve binarize=auto as a Config would (value range (0, 1) = Bernoulli)."""
    likelihood = "bernoulli" if tuple(value_range) == (0.0, 1.0) else "logistic"
    return data.model_copy(update={"binarize": resolve_binarize(data.binarize, likelihood)})


def _train(data: DataConfig, *, rank: int = 0, world_size: int = 1, batch: int = 32, seed: int = 7,
           value_range=(0.0, 1.0)):
    return build_train_stream(_resolved(data, value_range), image_size=28, channels=1, value_range=value_range, micro_batch_size=batch,
                              rank=rank, world_size=world_size, seed=seed, s3_cfg=None)


def _val(data: DataConfig, *, rank: int, world_size: int, batch: int, value_range=(0.0, 1.0)):
    return build_val_stream(_resolved(data, value_range), image_size=28, channels=1, value_range=value_range, batch_size=batch,
                            rank=rank, world_size=world_size, s3_cfg=None)


def _take(stream, n: int) -> list[dict]:
    return [next(stream) for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x["key"] == y["key"], f"batch {i}"
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"]), f"batch {i}"


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_at_several_cut_points(fashion_shards: Path, workers: int) -> None:
    # 500-sample shards, blocks of 64: 40 batches of 32 cross several shards and blocks per worker.
    data = DataConfig(train=str(fashion_shards), num_workers=workers, shuffle_buffer=64, binarize="dynamic",
                      random_flip=True)
    total = 40
    reference = _take(_train(data), total)
    assert len({k for b in reference for k in b["key"]}) > 500  # several shards were read
    for cut in (1, 7, 20, 33):
        first = _train(data)
        head = _take(first, cut)
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
        first.close()
        resumed = _train(data)
        resumed.load_state_dict(state)
        assert resumed.batches == cut
        _same(reference, head + _take(resumed, total - cut))


def test_exact_resume_with_weighted_sources(fashion_shards: Path) -> None:
    data = DataConfig(train=f"{fashion_shards}#train + {fashion_shards}#test", train_weights=[3.0, 1.0],
                      num_workers=2, shuffle_buffer=50)
    reference = _take(_train(data), 30)
    origin = Counter(k.split("_")[0] for b in reference for k in b["key"])
    assert 0.68 < origin["train"] / sum(origin.values()) < 0.82  # weights are sample fractions
    first = _train(data)
    head = _take(first, 11)
    resumed = _train(data)
    resumed.load_state_dict(first.state_dict())
    _same(reference, head + _take(resumed, 19))


def test_incompatible_state_is_refused(fashion_shards: Path) -> None:
    data = DataConfig(train=str(fashion_shards), num_workers=0)
    stream = _train(data, world_size=2)
    next(stream)
    state = stream.state_dict()
    with pytest.raises(DataError, match="world_size"):
        _train(data, world_size=4).load_state_dict(state)
    with pytest.raises(DataError, match="num_workers"):
        _train(DataConfig(train=str(fashion_shards), num_workers=2), world_size=2).load_state_dict(state)
    with pytest.raises(DataError, match="micro_batch_size"):
        _train(data, world_size=2, batch=16).load_state_dict(state)


def test_ranks_get_distinct_deterministic_streams(fashion_shards: Path) -> None:
    data = DataConfig(train=str(fashion_shards), num_workers=0, shuffle_buffer=100)
    streams = [_train(data, rank=r, world_size=2) for r in (0, 1)]
    rank0, rank1 = _take(streams[0], 5), _take(streams[1], 5)
    assert [b["key"] for b in rank0] != [b["key"] for b in rank1]  # seeds differ per rank
    _same(rank0, _take(_train(data, rank=0, world_size=2), 5))
    assert [b["key"] for b in _take(_train(data, rank=0, world_size=2, seed=8), 5)] != [b["key"] for b in rank0]


def test_values_match_the_raw_pixels(fashion_shards: Path) -> None:
    """Against the IDX files parsed with numpy in the tests (not the project's reader)."""
    raw = {"train": read_fashion_mnist("train"), "test": read_fashion_mnist("t10k")}
    data = DataConfig(train=str(fashion_shards), num_workers=0, binarize="none")
    batch = next(_train(data, value_range=(-1.0, 1.0)))
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (32, 1, 28, 28)
    for key, image, label in zip(batch["key"], batch["image"], batch["label"]):
        pool, i = key.split("_")
        expected = raw[pool][0][int(i)].astype(np.float64) / 255 * 2 - 1
        np.testing.assert_allclose(image[0].numpy(), expected, atol=1e-6)
        assert int(label) == raw[pool][1][int(i)]


def test_dynamic_binarization_tracks_intensity(fashion_shards: Path) -> None:
    data = DataConfig(train=str(fashion_shards), num_workers=0, binarize="dynamic")
    images = torch.cat([b["image"] for b in _take(_train(data), 20)])
    assert set(images.unique().tolist()) == {0.0, 1.0}
    plain = torch.cat([b["image"] for b in _take(_train(data.model_copy(update={"binarize": "none"})), 20)])
    assert abs(images.mean().item() - plain.mean().item()) < 0.01  # E[Bernoulli(x)] = x


@pytest.mark.parametrize("split, world, batch", [("val", 2, 32), ("test", 2, 64), ("test", 3, 100)])
def test_validation_covers_every_sample_once(fashion_shards: Path, split: str, world: int, batch: int) -> None:
    # val: 1 shard of 300 for 2 ranks x 2 workers (fewer shards than readers); test: 6 shards.
    data = DataConfig(val=f"{fashion_shards}#{split}", num_workers=2, binarize="fixed")
    seen: Counter[str] = Counter()
    counts = []
    for rank in range(world):
        stream = _val(data, rank=rank, world_size=world, batch=batch)
        batches = list(stream)
        counts.append(len(batches))
        assert len(batches) == len(stream)
        for b in batches:
            assert b["image"].shape[0] == batch and b["mask"].dtype == torch.bool
            assert all(k == "" for k, m in zip(b["key"], b["mask"]) if not m)
            assert (b["label"][~b["mask"]] == -1).all() and (b["image"][~b["mask"]] == 0).all()
            seen.update(k for k, m in zip(b["key"], b["mask"]) if m)
        assert stream.stats()["skipped_total"] == 0
    expected = 300 if split == "val" else 3000
    assert len(set(counts)) == 1  # equal batch counts on every rank
    assert len(seen) == expected and set(seen.values()) == {1}


def test_fixed_binarization_is_the_same_everywhere(fashion_shards: Path) -> None:
    data = DataConfig(val=str(fashion_shards), num_workers=0, binarize="fixed")
    one = {k: img for b in _val(data, rank=0, world_size=1, batch=50) for k, img, m in
           zip(b["key"], b["image"], b["mask"]) if m}
    other = {k: img for r in (0, 1) for b in _val(data, rank=r, world_size=2, batch=64) for k, img, m in
             zip(b["key"], b["image"], b["mask"]) if m}
    assert one.keys() == other.keys()
    assert all(torch.equal(one[k], other[k]) for k in one)
    assert set(torch.stack(list(one.values())).unique().tolist()) == {0.0, 1.0}


# ----------------------------------------------------------------------------- decoding policy


def _png(pixels: np.ndarray, mode: str | None = None) -> dict[str, bytes]:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buffer, format="PNG")
    return {"png": buffer.getvalue(), "cls": b"4"}


def _decode(members, channels=1, size=4, **kw):
    spec = DecodeSpec(image_size=size, channels=channels, value_range=(0.0, 1.0), **kw)
    return decode_sample("k", members, spec, np.random.default_rng(0))


def test_lossless_mode_conversions() -> None:
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4) * 10
    x, label = _decode(_png(gray), channels=3)
    assert label == 4 and x.shape == (3, 4, 4)
    for c in range(3):
        np.testing.assert_allclose(x[c], gray / 255, atol=1e-7)
    x, _ = _decode(_png(np.stack([gray] * 3, axis=-1)), channels=1)
    np.testing.assert_allclose(x[0], gray / 255, atol=1e-7)
    rgba = np.concatenate([np.stack([gray] * 3, -1), np.full((4, 4, 1), 255, np.uint8)], -1)
    assert _decode(_png(rgba), channels=3)[0].shape == (3, 4, 4)


@pytest.mark.parametrize("members, channels, reason", [
    (_png(np.random.default_rng(0).integers(0, 255, (4, 4, 3), dtype=np.uint8)), 1, "mode"),
    (_png(np.zeros((4, 4, 4), np.uint8)), 3, "mode"),  # transparent pixels
    (_png(np.zeros((4, 4), np.uint16) + 300), 1, "mode"),  # 16-bit
    (_png(np.zeros((5, 4), np.uint8)), 1, "size"),
    ({"png": b"\x89PNG garbage"}, 1, "undecodable"),
    ({"txt": b"hello"}, 1, "no_image"),
    ({"png": _png(np.zeros((4, 4), np.uint8))["png"], "cls": b"cat"}, 1, "bad_label"),
])
def test_rejections(members, channels: int, reason: str) -> None:
    with pytest.raises(SampleRejected) as info:
        _decode(members, channels=channels)
    assert info.value.reason == reason


def test_resize_and_crop() -> None:
    big = np.random.default_rng(1).integers(0, 255, (12, 8), dtype=np.uint8)
    assert _decode(_png(big), resize=True)[0].shape == (1, 4, 4)
    x, _ = _decode(_png(big), random_crop=True)
    assert x.shape == (1, 4, 4)
    assert any(np.allclose(x[0], big[t:t + 4, l:l + 4] / 255, atol=1e-7) for t in range(9) for l in range(5))
    with pytest.raises(SampleRejected):
        _decode(_png(np.zeros((3, 3), np.uint8)), random_crop=True)  # smaller: needs data.resize


def _prepared(n: int, height: int, width: int) -> list[Prepared]:
    pixels = np.random.default_rng(2).integers(0, 256, (n, height, width, 1), dtype=np.uint8)
    return [Prepared(image, label) for label, image in enumerate(pixels)]


@pytest.mark.parametrize("binarize, value_range, seeded", [
    ("dynamic", (0.0, 1.0), True), ("fixed", (0.0, 1.0), True), ("fixed", (0.0, 1.0), False),
    ("none", (-1.0, 1.0), True),
])
def test_a_batch_is_finished_as_its_samples_one_by_one(binarize: str, value_range, seeded: bool) -> None:
    """Without random crops or flips, one batch call makes the very images (and leaves the generator in the
    very state) that per-sample calls do: the training stream's batches did not change when it began to batch."""
    prepared, keys = _prepared(7, 4, 4), [f"k{i}" for i in range(7)]
    spec = DecodeSpec(image_size=4, channels=1, value_range=value_range, binarize=binarize)
    batch_rng, sample_rng = (np.random.default_rng(5), np.random.default_rng(5)) if seeded else (None, None)
    batch = finish_batch(prepared, keys, spec, batch_rng)
    one_by_one = np.stack([finish_sample(p, k, spec, sample_rng)[0] for p, k in zip(prepared, keys)])
    assert batch.dtype == np.float32 and batch.shape == (7, 1, 4, 4) and batch.flags.c_contiguous
    np.testing.assert_array_equal(batch, one_by_one)
    if seeded:
        assert batch_rng.random() == sample_rng.random()
    if binarize != "none":
        assert set(np.unique(batch)) == {0.0, 1.0}
    else:
        np.testing.assert_allclose(batch[:, 0], np.stack([p.array[..., 0] for p in prepared]) / 255 * 2 - 1, atol=1e-6)


def test_batch_crops_and_flips_come_from_each_sample() -> None:
    prepared, keys = _prepared(16, 6, 7), [str(i) for i in range(16)]
    spec = DecodeSpec(image_size=4, channels=1, value_range=(0.0, 1.0), random_crop=True, random_flip=True)
    batch = finish_batch(prepared, keys, spec, np.random.default_rng(9))
    np.testing.assert_array_equal(batch, finish_batch(prepared, keys, spec, np.random.default_rng(9)))
    flips = 0
    for image, p in zip(batch[:, 0], prepared):
        source = p.array[..., 0] / 255
        crops = [source[t:t + 4, l:l + 4] for t in range(3) for l in range(4)]
        plain = any(np.allclose(image, c, atol=1e-7) for c in crops)
        flips += not plain
        assert plain or any(np.allclose(image, c[:, ::-1], atol=1e-7) for c in crops)
    assert 0 < flips < 16
    assert finish_batch(prepared, keys, spec, np.random.default_rng(10)).tobytes() != batch.tobytes()


def test_pipe_and_http_sources(fashion_shards: Path) -> None:
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(fashion_shards))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        local = _take(_train(DataConfig(train=str(fashion_shards), num_workers=0)), 3)
        over_http = _take(_train(DataConfig(train=url, num_workers=0)), 3)  # index.json over http
        _same(local, over_http)
        data = DataConfig(train=f"{url}/train-{{000000..000005}}.tar", num_workers=0)
        assert len(next(_train(data))["key"]) == 32
        data = DataConfig(val=f"{url}/index.json#val", num_workers=0)
        assert sum(int(b["mask"].sum()) for b in _val(data, rank=0, world_size=1, batch=128)) == 300
    finally:
        server.shutdown()
        server.server_close()
    piped = DataConfig(train=f"pipe:cat {fashion_shards}/train-{{000000..000005}}.tar", num_workers=2)
    keys = [k for b in _take(_train(piped), 6) for k in b["key"]]
    assert len(keys) == 192 and all(k.startswith("train_") for k in keys)
