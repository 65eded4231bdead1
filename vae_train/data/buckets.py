"""Aspect-ratio buckets: which shapes a training batch may have, and which one an image goes to.

Photos come in many aspect ratios; cropping all of them to one square throws away
the sides of every landscape and the top of every portrait (diffusers#894), while
training at each image's own size would give batches of mixed shapes. Buckets (as
in Open-Sora's ``bucket_config`` and NovelAI's aspect-ratio bucketing) are the middle
way: a few shapes of about the same pixel count, each image goes to the bucket
nearest its aspect ratio (distance in log-ratio, so 2:1 and 1:2 are equally far from
1:1), and every batch is filled from one bucket. The stream
(:mod:`vae_train.data.stream`) does the filling; this module only decides shapes.

``data.aspect_buckets: auto`` derives the shapes from ``model.image_size``: its pixel
area at the aspect ratios 1:2, 9:16, 2:3, 3:4, 1:1, 4:3, 3:2, 16:9 and 2:1, each side
rounded to the model's downsampling factor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

AUTO_RATIOS = (1 / 2, 9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9, 2.0)
"""Width / height of the shapes ``auto`` makes."""


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


def resolve_buckets(setting: Sequence[Sequence[int]] | str, image_hw: tuple[int, int], multiple: int
                    ) -> tuple[tuple[int, int], ...]:
    """``data.aspect_buckets`` as a tuple of (H, W): ``auto`` derived from ``image_hw``, a list as given, () = off."""
    if setting == "auto":
        return auto_buckets(image_hw, multiple)
    return tuple((int(h), int(w)) for h, w in setting)


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the (H, W) bucket nearest ``width / height`` in log aspect ratio (the first on a tie)."""
    ratio = math.log(width / height)
    distances = [abs(ratio - math.log(w / h)) for h, w in buckets]
    return distances.index(min(distances))
