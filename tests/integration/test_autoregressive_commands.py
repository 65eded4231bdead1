"""Every user of the model works with the compact autoregressive VAE (the default job's architecture).

A tiny model of that family is trained by the real trainer (2 ranks, ZeRO-2, the
fused op) on real Fashion-MNIST shards, then: ``vae-train eval`` and ``vae-train
score`` report the IWAE value that :func:`vae_train.evaluate.iw_nll` gives on the
same images with the same seed; ``sample``, ``reconstruct``, ``interpolate`` write
their grids; ``export`` + ``load_model`` give the same likelihood as the checkpoint;
an interrupted run resumes to the same weights as an uninterrupted one; ZeRO-3 trains
the same weights as ZeRO-2.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.launching import clean_env, run, torchrun
from vae_train.cli import main

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

STEPS = 12
MODEL = ["model.arch=compact", "model.base_channels=8", "model.channel_mult=[1,1,2]", "model.latent_channels=8",
         "model.autoregressive_channels=8", "model.autoregressive_layers=2", "model.reparam=fused"]
IW_SAMPLES = 40
IMAGES = 12


def _train(shards: Path, run_dir: Path, *extra: str, script: str = "train.py", **env: str
           ) -> subprocess.CompletedProcess:
    cmd = torchrun(script, "--config", "configs/tiny.yaml", f"data.train={shards}", f"run_dir={run_dir}",
                   f"train.max_steps={STEPS}", "checkpoint.every_steps=6", "checkpoint.keep_last=5",
                   "distributed.zero_stage=2", *MODEL, *extra, nproc=2)  # later overrides win
    return run(cmd, env=clean_env(VAE_TRAIN_REQUIRE_FUSED="1", **env), timeout_s=300)


@pytest.fixture(scope="module")
def ar_run(fashion_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("ar-run")
    done = _train(fashion_shards, run_dir)
    assert done.returncode == 0, done.stderr[-4000:]
    return run_dir


def _first_images(checkpoint: Path, shards: Path, n: int) -> torch.Tensor:
    """The first ``n`` images of the stream the commands read (binarized once, fixed seed)."""
    from vae_train.commands.evaluate import _load, _settings, _stream, _take

    args = argparse.Namespace(checkpoint=str(checkpoint), data=str(shards), batch_size=n, binarize="auto", weights="auto",
                              config=None, overrides=["data.num_workers=0"])
    cfg = _settings(args)
    model = _load(args, cfg, torch.device("cpu"))
    return _take(_stream(args, cfg, model), n)[0]


def test_eval_and_score_report_the_library_iw_nll(ar_run: Path, fashion_shards: Path, tmp_path: Path) -> None:
    import vae_train
    from vae_train.evaluate import iw_nll

    checkpoint = ar_run / "checkpoints" / f"step-{STEPS:08d}"
    model = vae_train.load_model(str(checkpoint)).eval()
    x = _first_images(checkpoint, fashion_shards, IMAGES)
    expected = iw_nll(model, x, IW_SAMPLES, generator=torch.Generator().manual_seed(0)).numpy()

    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(fashion_shards), "--out", str(out),
                 "--iw-samples", str(IW_SAMPLES), "--batch-size", str(IMAGES), "--max-batches", "1",
                 "data.num_workers=0"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["images"] == IMAGES
    assert metrics["iw_nll_nats"] == pytest.approx(float(expected.mean()), rel=1e-6)
    assert metrics["iw_nll_nats"] < metrics["nelbo_nats"]

    scores = tmp_path / "scores.csv"
    assert main(["score", "--checkpoint", str(checkpoint), "--data", str(fashion_shards), "--out", str(scores),
                 "--iw-samples", str(IW_SAMPLES), "--max-images", str(IMAGES), "data.num_workers=0"]) == 0
    rows = list(csv.DictReader(scores.open()))
    assert len(rows) == IMAGES  # only the images asked for are scored
    assert [float(r["iw_nll_nats"]) for r in rows] == pytest.approx(expected.tolist(), rel=1e-6)


def test_image_commands_and_export(ar_run: Path, fashion_shards: Path, tmp_path: Path) -> None:
    import vae_train

    checkpoint = str(ar_run / "checkpoints" / f"step-{STEPS:08d}")
    assert main(["sample", "--checkpoint", checkpoint, "--n", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert main(["reconstruct", "--checkpoint", checkpoint, "--data", str(fashion_shards), "--n", "4",
                 "--out", str(tmp_path / "r.png"), "data.num_workers=0"]) == 0
    assert main(["interpolate", "--checkpoint", checkpoint, "--data", str(fashion_shards), "--pairs", "2",
                 "--steps", "3", "--out", str(tmp_path / "i.png"), "data.num_workers=0"]) == 0
    for name in ("s.png", "r.png", "i.png"):
        assert Image.open(tmp_path / name).size[0] > 28
    assert main(["export", checkpoint, "--out", str(tmp_path / "export")]) == 0
    exported, original = vae_train.load_model(str(tmp_path / "export")), vae_train.load_model(checkpoint)
    assert exported.is_autoregressive and exported.latent_shape == (8, 1, 1)
    x = _first_images(Path(checkpoint), fashion_shards, 4)
    z = torch.randn(4, *exported.latent_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(exported.decode(z, x), original.decode(z, x))


def test_resume_matches_the_uninterrupted_run(ar_run: Path, fashion_shards: Path, tmp_path: Path) -> None:
    """SIGKILLed right after the step-6 checkpoint, resumed to 12: the weights of the run that went straight on."""
    from vae_train.export import consolidated_state_dict

    first = _train(fashion_shards, tmp_path, script="tests/integration/train_kill_after_save.py",
                   VAE_TEST_KILL_AFTER_STEP="6")
    assert first.returncode != 0 and not (tmp_path / "checkpoints" / f"step-{STEPS:08d}").exists()
    second = _train(fashion_shards, tmp_path, "resume=auto")
    assert second.returncode == 0, second.stderr[-4000:]
    resumed, _ = consolidated_state_dict(tmp_path / "checkpoints" / f"step-{STEPS:08d}")
    straight, _ = consolidated_state_dict(ar_run / "checkpoints" / f"step-{STEPS:08d}")
    assert sorted(resumed) == sorted(straight)
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key


def test_zero3_trains_the_same_weights_as_zero2(ar_run: Path, fashion_shards: Path, tmp_path: Path) -> None:
    """Parameters partitioned across ranks (the masked convolutions included) change nothing but rounding."""
    from vae_train.export import consolidated_state_dict

    done = _train(fashion_shards, tmp_path, "distributed.zero_stage=3")
    assert done.returncode == 0, done.stderr[-4000:]
    zero3, _ = consolidated_state_dict(tmp_path / "checkpoints" / f"step-{STEPS:08d}")
    zero2, _ = consolidated_state_dict(ar_run / "checkpoints" / f"step-{STEPS:08d}")
    assert sorted(zero3) == sorted(zero2)
    assert max((zero3[k] - zero2[k]).abs().max().item() for k in zero2) <= 5e-6
    initial_moved = max(v.abs().max().item() for k, v in zero2.items() if "autoregressive.net.4" in k)
    assert initial_moved > 0  # the autoregressive output layer (zero at init) was trained
