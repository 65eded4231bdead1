"""The PNGs a run leaves for users: small grids are enlarged by whole factors, pixel for pixel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vae_train.logging import save_png


def test_a_narrow_grid_is_enlarged_by_the_smallest_whole_factor(tmp_path: Path) -> None:
    grid = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = np.asarray(Image.open(save_png(grid, tmp_path / "g.png", min_width=20)))
    assert out.shape == (15, 21, 3)  # ceil(20 / 7) = 3
    for dy in range(3):
        for dx in range(3):
            assert np.array_equal(out[dy::3, dx::3], grid)  # every pixel became a 3x3 block of itself


def test_a_grid_already_wide_enough_is_written_as_it_is(tmp_path: Path) -> None:
    grid = np.random.default_rng(1).integers(0, 256, (4, 9, 3), dtype=np.uint8)
    for min_width in (0, 9):
        assert np.array_equal(np.asarray(Image.open(save_png(grid, tmp_path / f"g{min_width}.png",
                                                             min_width=min_width))), grid)
