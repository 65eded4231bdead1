"""``data.classes``: the streams keep only the chosen labels, count the rest as filtered, resume exactly."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.unit.test_data_stream import _same, _take, _train, _val
from vae_train.config import DataConfig
from vae_train.data import DataError
from vae_train.data import classes as class_filter
from vae_train.data.datasets import FashionMnist

pytestmark = pytest.mark.timeout(180)


def _labels_of(split: str, shards: Path) -> Counter[int]:
    """Labels of every sample of a split, straight from the IDX arrays the shards were made from."""
    index = json.loads((shards / "index.json").read_text())
    raw = FashionMnist().arrays
    from vae_train.data.tario import iter_shard

    counts: Counter[int] = Counter()
    for shard in index["splits"][split]["shards"]:
        for key, _ in iter_shard(str(shards / shard["name"])):
            pool, i = key.split("_")
            counts[int(raw[pool][1][int(i)])] += 1
    return counts


@pytest.mark.parametrize("workers", [0, 2])
def test_train_stream_keeps_only_the_classes_and_resumes_exactly(fashion_shards: Path, workers: int) -> None:
    data = DataConfig(train=str(fashion_shards), num_workers=workers, shuffle_buffer=64, binarize="dynamic",
                      classes=[6, 2])
    reference = _take(_train(data), 24)
    labels = torch.cat([b["label"] for b in reference])
    assert set(labels.tolist()) == {2, 6}  # both kept, nothing else
    assert all(len(b["key"]) == 32 for b in reference)  # batches stay full
    for cut in (1, 13):
        first = _train(data)
        head = _take(first, cut)
        stats = first.stats()
        # about 8 of 10 samples are filtered; none is damage
        assert stats["filtered"] > 2 * cut * 32 and stats["skipped_total"] == 0
        state = json.loads(json.dumps(first.state_dict()))
        first.close()
        resumed = _train(data)
        resumed.load_state_dict(state)
        _same(reference, head + _take(resumed, 24 - cut))
    other = _train(data.model_copy(update={"classes": [6]}))
    with pytest.raises(DataError, match="classes"):
        other.load_state_dict(state)


def test_validation_masks_other_classes_and_keeps_equal_batches(fashion_shards: Path, data_log) -> None:
    data = DataConfig(val=f"{fashion_shards}#test", num_workers=2, binarize="fixed", classes=[8])
    expected = _labels_of("test", fashion_shards)
    seen: Counter[str] = Counter()
    batch_counts, filtered = [], 0
    for rank in range(2):
        stream = _val(data, rank=rank, world_size=2, batch=64)
        batches = list(stream)
        batch_counts.append(len(batches))
        for b in batches:
            assert (b["label"][b["mask"]] == 8).all()
            seen.update(k for k, m in zip(b["key"], b["mask"]) if m)
        assert stream.stats()["skipped_total"] == 0
        filtered += stream.stats()["filtered"]
    assert len(set(batch_counts)) == 1
    assert len(seen) == expected[8] and set(seen.values()) == {1}
    assert filtered == sum(expected.values()) - expected[8]
    assert "skipping" not in data_log.text  # filtering is not damage: no per-sample warnings


def test_a_label_that_never_occurs_is_a_startup_error(fashion_shards: Path) -> None:
    with pytest.raises(DataError, match=r"label\(s\) \[12\] never occur in data.train.*labels present: \[0, 1,"):
        _train(DataConfig(train=str(fashion_shards), num_workers=0, classes=[3, 12]))
    with pytest.raises(DataError, match=r"\[11\] never occur in data.val"):
        _val(DataConfig(val=str(fashion_shards), num_workers=0, classes=[11]), rank=0, world_size=1, batch=8)


def _unlabelled_shards(tmp_path: Path) -> Path:
    from vae_train.cli import main

    images = np.random.default_rng(0).integers(0, 256, size=(40, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    out = tmp_path / "shards"
    assert main(["prepare", "arrays", str(tmp_path / "images.npy"), "--out", str(out), "--workers", "1",
                 "--no-progress"]) == 0
    return out


def test_data_without_labels_is_a_startup_error(tmp_path: Path) -> None:
    shards = _unlabelled_shards(tmp_path)
    with pytest.raises(DataError, match="needs labelled samples.*no cls member"):
        _train(DataConfig(train=str(shards), num_workers=0, classes=[0]))
    with pytest.raises(DataError, match="needs labelled samples"):
        _val(DataConfig(val=str(shards), num_workers=0, classes=[0]), rank=0, world_size=1, batch=8)


def test_a_stream_that_never_finds_the_classes_stops_instead_of_spinning(fashion_shards: Path, monkeypatch) -> None:
    # Past the start-up probe's reach (a huge source), the worker's own guard ends the run.
    monkeypatch.setattr(class_filter, "PROBE_LIMIT", 1)
    monkeypatch.setattr("vae_train.data.stream.MAX_CONSECUTIVE_FILTERED", 500)
    stream = _train(DataConfig(train=str(fashion_shards), num_workers=0, classes=[12]))
    with pytest.raises(DataError, match="500 samples in a row .* had none of the labels data.classes=\\[12\\]"):
        next(stream)


def test_config_refuses_negative_or_repeated_classes() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="distinct labels >= 0"):
        DataConfig(classes=[1, 1])
    with pytest.raises(ValidationError, match="distinct labels >= 0"):
        DataConfig(classes=[-1])
