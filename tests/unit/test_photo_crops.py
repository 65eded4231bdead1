"""The skimage-photos prepare source: deterministic crops of the real photographs, pixel-exact."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vae_train.data.datasets import SKIMAGE_PHOTOS, PhotoCrops
from vae_train.data.errors import DataError

skimage_data = pytest.importorskip("skimage.data")


def _decode(members: dict[str, bytes]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(members["png"])))


def test_crops_are_regions_of_the_photos_and_reproducible() -> None:
    source = PhotoCrops(crop_size=16, crops_per_photo=3, seed=5)
    assert source.pools == {"train": 3 * len(SKIMAGE_PHOTOS)}
    key, members = source.encode("train", 4)  # photo 1 (coffee), crop 1
    crop = _decode(members)
    assert key.startswith("coffee_") and crop.shape == (16, 16, 3) and crop.dtype == np.uint8
    photo = skimage_data.coffee()
    windows = np.lib.stride_tricks.sliding_window_view(photo, (16, 16, 3))[:, :, 0]
    assert (windows == crop).all(axis=(2, 3, 4)).any(), "the crop is not a 16x16 region of the photo"
    assert np.array_equal(_decode(PhotoCrops(16, 3, seed=5).encode("train", 4)[1]), crop)
    assert not np.array_equal(_decode(PhotoCrops(16, 3, seed=6).encode("train", 4)[1]), crop)


def test_bad_sizes_are_clear_errors() -> None:
    with pytest.raises(DataError, match="larger than photo"):
        PhotoCrops(crop_size=320, crops_per_photo=1)
    with pytest.raises(DataError, match="crop-size"):
        PhotoCrops(crop_size=4, crops_per_photo=1)
