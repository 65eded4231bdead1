"""Inputs of ``vae-train prepare``: Fashion-MNIST IDX files, an image folder tree, uint8 arrays.

Each input is a :class:`DatasetSource`: named *pools* of samples (Fashion-MNIST
has ``train`` and ``test``; a folder or array file has one ``train`` pool) from
which :mod:`vae_train.data.prepare` carves the splits, and ``encode(pool, i)``
which returns the sample's key and tar members (``png`` lossless, ``cls`` when a
label is known). Encoding is deterministic, so shards are reproducible.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from vae_train.data.decode import SampleRejected
from vae_train.data.errors import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless PNG of a uint8 HxW (grayscale) or HxWx3/4 array."""
    from PIL import Image

    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def _members(png: bytes, label: int | None) -> dict[str, bytes]:
    members = {"png": png}
    if label is not None:
        members["cls"] = str(int(label)).encode("ascii")
    return members


class DatasetSource:
    """Base: pools of samples plus metadata for index.json and the plan fingerprint."""

    kind: str = ""
    pools: dict[str, int]
    identity: dict[str, Any]
    meta: dict[str, Any]

    def limit(self, n: int) -> None:
        """Keep only the first ``n`` samples of every pool (quick tests and smoke runs)."""
        self.pools = {pool: min(size, n) for pool, size in self.pools.items()}
        self.identity = {**self.identity, "limit": n}

    def encode(self, pool: str, i: int) -> tuple[str, dict[str, bytes]]:
        raise NotImplementedError


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file (optionally gzipped) as a uint8 array; ``magic`` 2051 = images, 2049 = labels."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        found, count = struct.unpack(">II", data[:8])
        if found != magic:
            raise ValueError(f"magic number {found}, expected {magic}")
        if magic == 2051:
            rows, cols = struct.unpack(">II", data[8:16])
            return np.frombuffer(data, np.uint8, count * rows * cols, 16).reshape(count, rows, cols)
        return np.frombuffer(data, np.uint8, count, 8)
    except (OSError, ValueError, struct.error) as exc:
        raise DataError(f"{path} is not a readable IDX file ({exc}); re-install dataset-fashion-mnist") from None


class FashionMnist(DatasetSource):
    """The four IDX files: pools ``train`` (60,000) and ``test`` (10,000, the t10k files)."""

    kind = "fashion-mnist"

    def __init__(self, directory: str | Path = FASHION_MNIST_DIR) -> None:
        directory = Path(directory)

        def find(stem: str) -> Path:
            for name in (stem, stem + ".gz"):
                if (directory / name).is_file():
                    return directory / name
            raise DataError(f"{directory / stem}[.gz] not found; install Fashion-MNIST "
                            "(apt-get install dataset-fashion-mnist) or pass --source DIR")

        self.arrays = {
            "train": (_read_idx(find("train-images-idx3-ubyte"), 2051), _read_idx(find("train-labels-idx1-ubyte"), 2049)),
            "test": (_read_idx(find("t10k-images-idx3-ubyte"), 2051), _read_idx(find("t10k-labels-idx1-ubyte"), 2049)),
        }
        self.pools = {pool: len(images) for pool, (images, _) in self.arrays.items()}
        self.identity = {"kind": self.kind, "pools": dict(self.pools)}
        self.meta = {"source": self.kind, "classes": FASHION_MNIST_CLASSES,
                     "image": {"height": 28, "width": 28, "channels": 1}}

    def encode(self, pool: str, i: int) -> tuple[str, dict[str, bytes]]:
        images, labels = self.arrays[pool]
        return f"{pool}_{i:06d}", _members(encode_png(images[i]), int(labels[i]))


class ArrayFile(DatasetSource):
    """A ``.npy`` of uint8 images (N,H,W[,C]) or a ``.npz`` with ``images`` and optional ``labels``."""

    kind = "arrays"

    def __init__(self, path: str | Path, labels_path: str | Path | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path} does not exist")
        labels = None
        try:
            if path.suffix == ".npz":
                archive = np.load(path, allow_pickle=False)
                names = list(archive.keys())
                key = "images" if "images" in names else (names[0] if len(names) == 1 else None)
                if key is None:
                    raise DataError(f"{path} holds arrays {names}; name the image array 'images' "
                                    "(and the optional label array 'labels')")
                images = archive[key]
                labels = archive["labels"] if "labels" in names else None
            elif path.suffix == ".npy":
                images = np.load(path, mmap_mode="r", allow_pickle=False)
            else:
                raise DataError(f"{path}: expected a .npy or .npz file")
            if labels_path is not None:
                labels = np.load(labels_path, allow_pickle=False)
        except ValueError as exc:
            raise DataError(f"cannot load {path}: {exc} (object arrays are refused: they would need unpickling)") from None
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3, 4)):
            raise DataError(f"{path}: expected uint8 images shaped (N,H,W) or (N,H,W,C) with C in 1,3,4; "
                            f"got {images.dtype} {images.shape}")
        if labels is not None and (labels.ndim != 1 or len(labels) != len(images)
                                   or not np.issubdtype(labels.dtype, np.integer)):
            raise DataError(f"labels must be one integer per image ({len(images)}), got {labels.dtype} {labels.shape}")
        self.images, self.labels = images, labels
        self.pools = {"train": len(images)}
        self.identity = {"kind": self.kind, "path": str(path.resolve()), "shape": list(images.shape),
                         "labels": labels is not None}
        channels = 1 if images.ndim == 3 else images.shape[3]
        self.meta = {"source": self.kind, "image": {"height": images.shape[1], "width": images.shape[2],
                                                     "channels": channels}}

    def encode(self, pool: str, i: int) -> tuple[str, dict[str, bytes]]:
        label = int(self.labels[i]) if self.labels is not None else None
        return f"{i:08d}", _members(encode_png(np.asarray(self.images[i])), label)


def _image_extensions() -> set[str]:
    from PIL import Image

    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


class ImageFolder(DatasetSource):
    """Every image under ``root`` (any format Pillow opens), labels from first-level folder names.

    PNG files are stored byte for byte; other formats are decoded and re-encoded as
    PNG (lossless with respect to the decoded pixels). A file Pillow cannot decode
    is skipped with a warning and counted.
    """

    kind = "images"

    def __init__(self, root: str | Path, labels_from_folders: bool = False) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root} is not a directory of images")
        extensions = _image_extensions()
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                       if p.is_file() and p.suffix.lower() in extensions)
        if not files:
            raise DataError(f"no image files under {root} (looked for {', '.join(sorted(extensions)[:8])}, ...)")
        self.root, self.files = root, files
        self.classes: list[str] = []
        if labels_from_folders:
            top = [name.split("/", 1)[0] if "/" in name else None for name in files]
            if None in top:
                raise DataError(f"--labels-from-folders needs every image inside a class folder; "
                                f"{files[top.index(None)]!r} is directly in {root}")
            self.classes = sorted(set(top))  # type: ignore[arg-type]
        keys: dict[str, str] = {}
        for name in files:
            key = self._key(name)
            if key in keys:
                raise DataError(f"{keys[key]!r} and {name!r} would get the same sample key {key!r}; rename one")
            keys[key] = name
        self.pools = {"train": len(files)}
        self.identity = {"kind": self.kind, "root": str(root.resolve()), "files": len(files),
                         "labels": labels_from_folders}
        self.meta = {"source": self.kind, **({"classes": self.classes} if self.classes else {})}

    @staticmethod
    def _key(name: str) -> str:
        """The relative path without its extension; dots become underscores (WebDataset splits on dots)."""
        stem = name.rsplit(".", 1)[0]
        return stem.replace(".", "_")

    def encode(self, pool: str, i: int) -> tuple[str, dict[str, bytes]]:
        from PIL import Image

        name = self.files[i]
        label = self.classes.index(name.split("/", 1)[0]) if self.classes else None
        data = (self.root / name).read_bytes()
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
            if image.format != "PNG":
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                data = buffer.getvalue()
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types for corrupt files
            raise SampleRejected("undecodable", f"{os.path.join(self.root, name)}: {type(exc).__name__}: {exc}") from None
        return self._key(name), _members(data, label)


SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "motorcycle_right",
                  "hubble_deep_field", "retina")
"""The real RGB photographs the scikit-image wheel ships (no download)."""


class PhotoCrops(DatasetSource):
    """Random square crops of scikit-image's real photographs (``skimage.data``): a CPU-sized RGB set.

    ``crops_per_photo`` crops of ``crop_size`` pixels per photo, at positions drawn from
    ``(seed, sample index)``: deterministic, so shards are reproducible. The
    validation split ``prepare`` carves out holds other crops of the same photos.
    """

    kind = "skimage-photos"

    def __init__(self, crop_size: int = 64, crops_per_photo: int = 256, seed: int = 0) -> None:
        try:
            import skimage.data  # noqa: F401
        except ImportError:
            raise DataError("the skimage-photos source needs scikit-image (pip install scikit-image)") from None
        if crop_size < 8 or crops_per_photo < 1:
            raise DataError(f"--crop-size must be >= 8 and --crops-per-photo >= 1, got {crop_size}, {crops_per_photo}")
        self.crop_size, self.crops_per_photo, self.seed = crop_size, crops_per_photo, seed
        self._photos: dict[str, np.ndarray] = {}
        small = [name for name in SKIMAGE_PHOTOS if min(self._photo(name).shape[:2]) < crop_size]
        if small:
            raise DataError(f"--crop-size {crop_size} is larger than photo(s) {', '.join(small)}")
        self.pools = {"train": len(SKIMAGE_PHOTOS) * crops_per_photo}
        self.identity = {"kind": self.kind, "crop_size": crop_size, "crops_per_photo": crops_per_photo, "seed": seed}
        self.meta = {"source": self.kind, "photos": list(SKIMAGE_PHOTOS)}

    def _photo(self, name: str) -> np.ndarray:
        if name not in self._photos:
            import skimage.data

            if name.startswith("motorcycle_"):
                left, right, _ = skimage.data.stereo_motorcycle()
                pixels = left if name.endswith("left") else right
            else:
                pixels = getattr(skimage.data, name)()
            if pixels.ndim == 2:
                pixels = np.repeat(pixels[:, :, None], 3, axis=2)
            self._photos[name] = np.ascontiguousarray(pixels[:, :, :3])
        return self._photos[name]

    def encode(self, pool: str, i: int) -> tuple[str, dict[str, bytes]]:
        name = SKIMAGE_PHOTOS[i // self.crops_per_photo]
        photo = self._photo(name)
        rng = np.random.default_rng([self.seed, i])
        top = int(rng.integers(0, photo.shape[0] - self.crop_size + 1))
        left = int(rng.integers(0, photo.shape[1] - self.crop_size + 1))
        crop = photo[top:top + self.crop_size, left:left + self.crop_size]
        return f"{name}_{i:06d}", _members(encode_png(crop), None)
