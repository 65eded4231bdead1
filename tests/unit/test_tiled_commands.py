"""``vae-train eval`` / ``reconstruct`` of a non-square model on real photos, at its own size and larger, tiled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vae_train.cli import main

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small RGB model built for 32x48 (H x W) images, exported as `vae-train export` writes it."""
    from safetensors.torch import save_file

    from vae_train.config import ModelConfig
    from vae_train.export import CONFIG_FILE, EXPORT_FORMAT, WEIGHTS_FILE
    from vae_train.model import ConvVAE

    cfg = ModelConfig(in_channels=3, image_size=[32, 48], base_channels=8, channel_mult=[1, 2, 2], norm_groups=4,
                      likelihood="logistic", reparam="reference")
    torch.manual_seed(0)
    model = ConvVAE(cfg)
    out = tmp_path_factory.mktemp("rgb32x48")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps({"format": EXPORT_FORMAT, "model": cfg.model_dump(mode="json"),
                                               "dtype": "fp32", "step": 0, "library_version": "test"}))
    return out


def _eval(exported: Path, photos: Path, out: Path, *extra: str) -> dict:
    assert main(["eval", "--checkpoint", str(exported), "--data", str(photos), "--out", str(out), *extra,
                 "data.resize=true", "data.num_workers=0"]) == 0
    return json.loads(out.read_text())


def test_eval_at_the_model_size_and_larger_tiled(exported: Path, photo_shards, tmp_path: Path) -> None:
    plain = _eval(exported, photo_shards.path, tmp_path / "plain.json")
    assert plain["images"] > 0 and plain["latent_units"] == 4 * 8 * 12
    # one tile as large as the image: exactly the untiled numbers
    single = _eval(exported, photo_shards.path, tmp_path / "single.json", "--tile", "32,48")
    assert {k: v for k, v in single.items() if k != "data"} == {k: v for k, v in plain.items() if k != "data"}
    # twice the size, in tiles of the training size: latents and bits/dim counted for 64x96
    big = _eval(exported, photo_shards.path, tmp_path / "big.json", "--image-size", "64,96", "--tile", "train")
    whole = _eval(exported, photo_shards.path, tmp_path / "whole.json", "--image-size", "64,96")
    assert big["images"] == whole["images"] == plain["images"]
    assert big["latent_units"] == whole["latent_units"] == 4 * 16 * 24
    assert big["psnr_db"] == pytest.approx(whole["psnr_db"], abs=1.0)
    assert big["nelbo_bpd"] == pytest.approx(whole["nelbo_bpd"], rel=0.05)


def test_reconstruct_larger_images_in_tiles(exported: Path, photo_shards, tmp_path: Path) -> None:
    out = tmp_path / "recon.png"
    assert main(["reconstruct", "--checkpoint", str(exported), "--data", str(photo_shards.path), "--n", "2",
                 "--out", str(out), "--image-size", "64,96", "--tile", "train", "--tile-overlap", "16",
                 "data.resize=true", "data.num_workers=0"]) == 0
    with Image.open(out) as grid:
        width, height = grid.size
    assert height >= 64 and width >= 2 * 96  # input beside reconstruction, at 64x96


@pytest.mark.parametrize(("extra", "message"), [
    (["--image-size", "62,96"], "multiples of the model's downsampling factor 4"),
    (["--tile", "30"], "multiples of the downsampling factor 4"),
    (["--tile-overlap", "8"], "--tile-overlap needs --tile"),
    (["--image-size", "big"], "H or H,W"),
])
def test_bad_size_options_get_clear_errors(exported: Path, photo_shards, tmp_path: Path, extra: list[str],
                                           message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--checkpoint", str(exported), "--data", str(photo_shards.path), *extra,
                 "data.resize=true", "data.num_workers=0"]) == 2
    assert message in capsys.readouterr().err
