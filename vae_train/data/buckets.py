"""Aspect-ratio buckets: which shapes a training batch may have, and which one an image goes to.

Photos come in many aspect ratios; cropping all of them to one square throws away
the sides of every landscape and the top of every portrait (diffusers#894), while
training at each image's own size would give batches of mixed shapes. Buckets (as
in Open-Sora's ``bucket_config`` and NovelAI's aspect-ratio bucketing) are the middle
way: a few shapes of about the same pixel count, each image goes to the bucket
nearest its aspect ratio (distance in log-ratio, so 2:1 and 1:2 are equally far from
1:1), and every batch is filled from one bucket. The stream
(:mod:`vae_train.data.stream`) does the filling; this module only decides shapes.

``data.aspect_buckets: auto`` starts from ``model.image_size``'s pixel area at the
aspect ratios 1:2, 9:16, 2:3, 3:4, 1:1, 4:3, 3:2, 16:9 and 2:1, each side rounded to
the model's downsampling factor, and keeps the shapes the data's images actually go
to: ``vae-train prepare`` records each shard's aspect-ratio histogram in index.json
(:class:`AspectCounter`), so the choice is read from the index, the same on every
rank, without opening a shard. A shape no image maps to would never fill a batch
(nor compile, nor be tested); when the index has no histograms (shards made
elsewhere, an older index) all nine shapes stay, with a logged note.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence

from vae_train.data.decode import IMAGE_EXTENSIONS, SampleRejected, image_dimensions

log = logging.getLogger("vae_train.data")

AUTO_RATIOS = (1 / 2, 9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9, 2.0)
"""Width / height of the shapes ``auto`` makes."""


def ratio_key(width: int, height: int) -> str:
    """An image's width / height as index.json's histograms key it: 4 significant digits.

    A relative precision of 1e-4 moves an image to another bucket only when its ratio
    lies within 0.01 % of the midpoint between two buckets; the key set stays small
    (one key per distinct ratio, not per size) and readable (``"1.5"``, ``"0.6667"``).
    """
    return f"{width / height:.4g}"


class AspectCounter:
    """Counts images by :func:`ratio_key` as a shard is written or scanned (index.json's ``aspect_ratios``).

    A sample without an image member (latent shards) means the shard is not one of
    images: its histogram is None. An image whose header cannot be read is left out,
    as the stream will reject it.
    """

    def __init__(self) -> None:
        self._counts: Counter[str] | None = Counter()

    def add(self, members: Mapping[str, bytes]) -> None:
        """Count one sample's image (members by extension, as stored)."""
        if self._counts is None:
            return
        if not any(ext in members for ext in IMAGE_EXTENSIONS):
            self._counts = None
            return
        try:
            width, height = image_dimensions(dict(members))
        except SampleRejected:
            return
        self._counts[ratio_key(width, height)] += 1

    def histogram(self) -> dict[str, int] | None:
        """{ratio key: images}, sorted by key; None when a sample was not an image."""
        return None if self._counts is None else dict(sorted(self._counts.items()))


def auto_buckets(image_hw: tuple[int, int], multiple: int) -> tuple[tuple[int, int], ...]:
    """(H, W) shapes of about ``image_hw``'s pixel area at :data:`AUTO_RATIOS`, sides multiples of ``multiple``."""
    area = image_hw[0] * image_hw[1]
    shapes: list[tuple[int, int]] = []
    for ratio in AUTO_RATIOS:
        height = math.sqrt(area / ratio)
        h = max(multiple, round(height / multiple) * multiple)
        w = max(multiple, round(height * ratio / multiple) * multiple)
        if (h, w) not in shapes:
            shapes.append((h, w))
    return tuple(shapes)


def bucket_counts(ratios: Mapping[str, int], buckets: Sequence[tuple[int, int]]) -> list[int]:
    """Images per bucket when each ratio of the histogram ``ratios`` goes to its nearest bucket."""
    counts = [0] * len(buckets)
    for key, n in ratios.items():
        counts[_nearest(math.log(float(key)), buckets)] += int(n)
    return counts


def resolve_buckets(setting: Sequence[Sequence[int]] | str, image_hw: tuple[int, int], multiple: int,
                    ratios: Mapping[str, int] | None = None) -> tuple[tuple[int, int], ...]:
    """``data.aspect_buckets`` as a tuple of (H, W): a list as given, () = off, ``auto`` derived.

    ``auto``: the shapes of :func:`auto_buckets` that the training data's aspect-ratio
    histogram ``ratios`` (from index.json) maps images to, in their order; all of them,
    with a logged note, when ``ratios`` is None (the index recorded no sizes) or empty.
    """
    if setting != "auto":
        return tuple((int(h), int(w)) for h, w in setting)
    shapes = auto_buckets(image_hw, multiple)
    if not ratios:
        log.info("data.aspect_buckets=auto: the training data's index.json records no image aspect ratios (shards "
                 "made elsewhere or by an older `vae-train prepare`; `vae-train prepare index DIR` adds them), so "
                 "all %d shapes are used: %s", len(shapes), _shapes_text(shapes))
        return shapes
    counts = bucket_counts(ratios, shapes)
    kept = tuple(shape for shape, n in zip(shapes, counts) if n)
    dropped = [shape for shape, n in zip(shapes, counts) if not n]
    log.info("data.aspect_buckets=auto: %d of %d shapes hold the data's images (%s)%s", len(kept), len(shapes),
             ", ".join(f"{h}x{w}: {n}" for (h, w), n in zip(shapes, counts) if n),
             f"; no image is nearest {_shapes_text(dropped)}, left out" if dropped else "")
    return kept


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the (H, W) bucket nearest ``width / height`` in log aspect ratio (the first on a tie)."""
    return _nearest(math.log(width / height), buckets)


def _nearest(log_ratio: float, buckets: Sequence[tuple[int, int]]) -> int:
    distances = [abs(log_ratio - math.log(w / h)) for h, w in buckets]
    return distances.index(min(distances))


def _shapes_text(shapes: Sequence[tuple[int, int]]) -> str:
    return ", ".join(f"{h}x{w}" for h, w in shapes)
