"""`vae-train prepare`: round trip, index, atomic/resumable writes, job-array slices, bad input."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.trained_vae import read_fashion_mnist
from vae_train.cli import main
from vae_train.data.errors import DataError
from vae_train.data.index import ShardIndex
from vae_train.data.tario import ShardWriter, iter_shard, scan_shard

pytestmark = pytest.mark.timeout(120)


def _prepare(*args: str) -> int:
    return main(["prepare", *args, "--no-progress"])


def _read_split(out: Path, split: str) -> dict[str, tuple[np.ndarray, int | None]]:
    index = ShardIndex.from_json((out / "index.json").read_text(), "index")
    samples = {}
    for record in index.shards(split):
        for key, members in iter_shard(str(out / record.name)):
            label = int(members["cls"]) if "cls" in members else None
            samples[key] = (np.asarray(Image.open(io.BytesIO(members["png"]))), label)
    return samples


def test_fashion_index_counts_and_hashes(fashion_shards: Path) -> None:
    index = ShardIndex.from_json((fashion_shards / "index.json").read_text(), "index")
    assert {s: index.num_samples(s) for s in index.splits} == {"train": 2700, "val": 300, "test": 3000}
    assert [r.name for r in index.shards("train")] == [f"train-{k:06d}.tar" for k in range(6)]
    for split in index.splits:
        for record in index.shards(split):
            path = fashion_shards / record.name
            assert hashlib.sha256(path.read_bytes()).hexdigest() == record.sha256
            assert path.stat().st_size == record.bytes
            assert sum(1 for _ in iter_shard(str(path))) == record.num_samples


def test_the_numpy_idx_oracle_reads_fashion_mnist_as_published() -> None:
    """The oracle itself, against the dataset's published facts: 60,000 + 10,000 28x28 images, 10 balanced classes."""
    for split, n in (("train", 60_000), ("t10k", 10_000)):
        images, labels = read_fashion_mnist(split)
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8 and labels.shape == (n,)
        assert np.bincount(labels).tolist() == [n // 10] * 10
        assert images.min() == 0 and images.max() == 255


def test_fashion_round_trip_is_bit_exact(fashion_shards: Path) -> None:
    """Every image and label in the shards equals the IDX files parsed with numpy (not the project's reader)."""
    oracle = {"train": read_fashion_mnist("train"), "test": read_fashion_mnist("t10k")}
    seen = {}
    for split in ("train", "val", "test"):
        for key, (pixels, label) in _read_split(fashion_shards, split).items():
            pool, i = key.split("_")
            images, labels = oracle[pool]
            np.testing.assert_array_equal(pixels, images[int(i)])
            assert label == labels[int(i)]
            assert key not in seen
            seen[key] = split
    train_keys = {k for k, s in seen.items() if s in ("train", "val")}
    assert train_keys == {f"train_{i:06d}" for i in range(3000)}  # val carved from train, disjoint
    assert {k for k, s in seen.items() if s == "test"} == {f"test_{i:06d}" for i in range(3000)}


def test_arrays_round_trip_gray_and_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (37, 9, 7), dtype=np.uint8)
    rgb = rng.integers(0, 256, (23, 5, 6, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, 37)
    np.savez(tmp_path / "gray.npz", images=gray, labels=labels)
    np.save(tmp_path / "rgb.npy", rgb)
    assert _prepare("arrays", str(tmp_path / "gray.npz"), "--out", str(tmp_path / "g"), "--samples-per-shard", "8",
                    "--workers", "2") == 0
    assert _prepare("arrays", str(tmp_path / "rgb.npy"), "--out", str(tmp_path / "c"), "--val-fraction", "0") == 0
    got = {**_read_split(tmp_path / "g", "train"), **_read_split(tmp_path / "g", "val")}
    assert len(got) == 37
    for key, (pixels, label) in got.items():
        np.testing.assert_array_equal(pixels, gray[int(key)])
        assert label == labels[int(key)]
    got = _read_split(tmp_path / "c", "train")
    assert len(got) == 23 and all(label is None for _, label in got.values())
    for key, (pixels, _) in got.items():
        np.testing.assert_array_equal(pixels, rgb[int(key)])


def test_byte_limit_lowers_samples_per_shard(tmp_path: Path) -> None:
    images = np.random.default_rng(1).integers(0, 256, (40, 16, 16), dtype=np.uint8)  # ~ 1.5 KiB per sample
    np.save(tmp_path / "a.npy", images)
    assert _prepare("arrays", str(tmp_path / "a.npy"), "--out", str(tmp_path / "o"), "--val-fraction", "0",
                    "--max-shard-bytes", "20000") == 0
    index = ShardIndex.from_json((tmp_path / "o" / "index.json").read_text(), "index")
    assert len(index.shards("train")) > 5 and index.num_samples("train") == 40
    assert all(record.bytes <= 20000 for record in index.shards("train"))


def test_images_folder_labels_and_corrupt_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    rng = np.random.default_rng(2)
    expected = {}
    for cls in ("cat", "dog"):
        (src / cls).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(src / cls / f"img.{i}.png")
            expected[f"{cls}/img_{i}"] = (pixels, ["cat", "dog"].index(cls))
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(src / "dog" / "x.bmp")
    expected["dog/x"] = (np.asarray(Image.open(src / "dog" / "x.bmp")), 1)
    (src / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert _prepare("images", str(src), "--out", str(tmp_path / "o"), "--labels-from-folders",
                    "--val-fraction", "0") == 0
    got = _read_split(tmp_path / "o", "train")
    assert set(got) == set(expected)  # the broken file was skipped
    for key, (pixels, label) in got.items():
        np.testing.assert_array_equal(pixels, expected[key][0])
        assert label == expected[key][1]


def test_shard_writer_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "train-000000.tar"
    with pytest.raises(RuntimeError):
        with ShardWriter(path) as writer:
            writer.add("a", {"png": b"x" * 1000})
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with ShardWriter(path) as writer:
        writer.add("a", {"png": b"x" * 1000, "cls": b"1"})
        record = writer.commit()
    assert scan_shard(path) == record and record.num_samples == 1


def _run_prepare_cli(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vae_train", "prepare", "fashion-mnist", "--out", str(out), "--limit", "1500",
           "--samples-per-shard", "50", "--workers", "1", "--no-progress", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_prepare_leaves_no_partial_shard_and_resumes(tmp_path: Path) -> None:
    out, reference = tmp_path / "killed", tmp_path / "reference"
    proc = _run_prepare_cli(out)
    deadline = time.monotonic() + 60
    while len(list(out.glob("*.tar"))) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "prepare finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "index.json").exists()
    finals = sorted(out.glob("*.tar"))
    assert finals, "prepare wrote no shard before it was killed"
    assert _run_prepare_cli(reference).wait() == 0
    ref_index = json.loads((reference / "index.json").read_text())
    ref_records = {s["name"]: s for split in ref_index["splits"].values() for s in split["shards"]}
    for path in finals:  # every final-named shard is complete and identical to a clean run's
        assert scan_shard(path).sha256 == ref_records[path.name]["sha256"]
    resumed = _run_prepare_cli(out)
    _, err = resumed.communicate()
    assert resumed.returncode == 0, err
    assert "resuming" in err
    assert (out / "index.json").read_bytes() == (reference / "index.json").read_bytes()
    assert not list(out.glob(".*.partial"))


def test_slices_merge_to_the_single_process_output(tmp_path: Path) -> None:
    images = np.random.default_rng(3).integers(0, 256, (50, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=images, labels=np.arange(50) % 3)
    common = ["arrays", str(tmp_path / "a.npz"), "--samples-per-shard", "7", "--val-fraction", "0.2"]
    assert _prepare(*common, "--out", str(tmp_path / "single")) == 0
    for i in (2, 0, 1):
        assert _prepare(*common, "--out", str(tmp_path / "sliced"), "--num-slices", "3", "--slice", str(i)) == 0
    assert not (tmp_path / "sliced" / "index.json").exists()
    assert main(["prepare", "index", str(tmp_path / "sliced")]) == 0
    single = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert sorted(p.name for p in (tmp_path / "sliced").iterdir() if p.name != "_slices") == single
    for name in single:
        assert (tmp_path / "single" / name).read_bytes() == (tmp_path / "sliced" / name).read_bytes(), name


def test_missing_slice_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    np.save(tmp_path / "a.npy", np.zeros((20, 4, 4), np.uint8))
    common = ["arrays", str(tmp_path / "a.npy"), "--samples-per-shard", "3", "--out", str(tmp_path / "o")]
    assert _prepare(*common, "--num-slices", "2", "--slice", "0") == 0
    assert main(["prepare", "index", str(tmp_path / "o")]) == 2
    assert "not finished" in capsys.readouterr().err


def test_changed_options_need_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    np.save(tmp_path / "a.npy", np.zeros((20, 4, 4), np.uint8))
    common = ["arrays", str(tmp_path / "a.npy"), "--out", str(tmp_path / "o")]
    assert _prepare(*common, "--samples-per-shard", "3") == 0
    assert _prepare(*common, "--samples-per-shard", "5") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _prepare(*common, "--samples-per-shard", "5", "--overwrite") == 0
    index = ShardIndex.from_json((tmp_path / "o" / "index.json").read_text(), "index")
    assert len(index.shards("train")) == 4
    assert sorted(p.name for p in (tmp_path / "o").glob("train-*.tar")) == [f"train-{k:06d}.tar" for k in range(4)]


def test_index_of_foreign_shards(tmp_path: Path) -> None:
    for k, n in enumerate((3, 2)):
        with ShardWriter(tmp_path / f"train-{k:06d}.tar") as writer:
            for i in range(n):
                writer.add(f"s{k}_{i}", {"png": b"x"})
            writer.commit()
    index = __import__("vae_train.data.prepare", fromlist=["write_index"]).write_index(str(tmp_path))
    assert index.num_samples("train") == 5
    assert ShardIndex.from_json((tmp_path / "index.json").read_text(), "i").num_samples("train") == 5


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (np.zeros((3, 4, 4), np.float32), "uint8"),
    (np.array([{"a": 1}], dtype=object), "unpickling"),
])
def test_bad_array_input_is_a_clear_error(tmp_path: Path, content, message: str) -> None:
    from vae_train.data.datasets import ArrayFile

    path = tmp_path / "a.npy"
    if content is not None:
        np.save(path, content, allow_pickle=True)
    with pytest.raises(DataError, match=message):
        ArrayFile(path)


def test_missing_fashion_mnist_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _prepare("fashion-mnist", "--source", str(tmp_path), "--out", str(tmp_path / "o")) == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o" / "index.json")
